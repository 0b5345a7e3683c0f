"""phase=report on real trace stores: from a real bench through the gateway, and planted.

The bench test runs `python run.py phase=bench` (engine + gateway + load client) on
the tiny model and checks the report against the bench's own figures; changing the
prompt file gives a new version in the traces, the bench results and the report.
"""

from __future__ import annotations

import csv
import json
import shutil
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from threading import Thread
from typing import ClassVar

import pytest

from lmstack.serving.traces import TRACE_DB_NAME, TraceRecord, TraceStore, read_traces

from conftest import assert_rejected_early, run_cli, run_dirs

PROMPT = """# A test prompt, in a config group folder of its own.
defaults:
  - schema
  - _self_
name: mine
template: "{template}"
"""
BENCH = [
    "phase=bench",
    "logger=none",
    "bench.num_requests=8",
    "bench.max_concurrency=4",
    "bench.max_tokens=8",
    "bench.warmup_requests=2",
    "prompt=mine",
]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def first_bench(tiny_base, tmp_path_factory):
    """One bench through the gateway with a prompt from a file: (prompt file, its run dir)."""
    tmp_path = tmp_path_factory.mktemp("bench")
    (tmp_path / "conf" / "prompt").mkdir(parents=True)
    prompt_file = tmp_path / "conf" / "prompt" / "mine.yaml"
    prompt_file.write_text(PROMPT.format(template="{question}"))
    run_cli(*bench_args(tiny_base, prompt_file), output_dir=tmp_path / "out", timeout=300)
    (run_dir,) = run_dirs(tmp_path / "out" / "runs")
    return prompt_file, run_dir


def bench_args(tiny_base: Path, prompt_file: Path) -> list[str]:
    search = f"hydra.searchpath=[file://{prompt_file.parent.parent}]"
    return [*BENCH, f"serving.model={tiny_base}", search]


def test_bench_through_gateway_leaves_traces_that_agree_with_the_report(first_bench, tmp_path):
    _, run_dir = first_bench
    bench = read_metrics(run_dir)
    rows = read_traces(run_dir / TRACE_DB_NAME)
    # one trace row per request, every field filled; the warm-up requests are tagged
    assert len(rows) == bench["bench/completed"] == 8
    warmups = read_traces(run_dir / TRACE_DB_NAME, include_warmup=True)[:2]
    assert [row["tag"] for row in warmups] == ["warmup", "warmup"]
    for row in rows:
        assert row["prompt_version"] == bench["bench/prompt_version"]
        assert row["artifact_hash"] == bench["bench/served"]["artifact_hash"]
        assert row["status"] == 200 and row["stream"] == 1 and row["usage_source"] == "upstream"
        blank_ok = ("error", "tag", "variant", "user")  # no A/B test, no user ids here
        empty = [k for k, v in row.items() if v is None or (v == "" and k not in blank_ok)]
        assert empty == ["run_id"]  # a model folder, not an lmstack run: it has no run id
    run_cli("phase=report", f"report.source={run_dir}", "logger=none", output_dir=tmp_path)
    (report_dir,) = run_dirs(tmp_path)
    report = read_metrics(report_dir)
    assert report["report/requests"] == bench["bench/completed"]
    assert report["report/prompt_tokens"] == bench["bench/prompt_tokens"]
    assert report["report/completion_tokens"] == bench["bench/output_tokens"]
    # the gateway's clock starts a little after the client's and stops a little before: within
    # 15%, or 25 ms of the client's own overhead where answers are fast (a 90 ms answer on an
    # AVX-512 Xeon measured 78 ms at the gateway)
    for q in (50, 99):
        gateway_ms, client_ms = report[f"report/latency_ms_p{q}"], bench[f"bench/e2el_ms_p{q}"]
        assert gateway_ms <= client_ms + 1
        assert gateway_ms == pytest.approx(client_ms, rel=0.15, abs=25)
        ttft_gateway, ttft_client = report[f"report/ttft_ms_p{q}"], bench[f"bench/ttft_ms_p{q}"]
        # the first token reaches the gateway before the client; a client process waiting for
        # a core (two test workers on 2 cores) saw it 33 ms later than the gateway did
        assert ttft_gateway <= ttft_client + 1
        assert ttft_gateway == pytest.approx(ttft_client, rel=0.25, abs=50)
    # the bench prices itself from the same traces the report reads
    assert report["cost/usd_total"] == pytest.approx(bench["cost/usd_total"])
    assert bench["cost/usd_total"] > 0
    assert (report_dir / "report.md").is_file()
    assert (report_dir / "report_latency_cost.png").stat().st_size > 1000


def test_changed_prompt_file_shows_a_new_version_in_traces_and_results(
    first_bench, tiny_base, tmp_path
):
    prompt_file, first = first_bench
    old_version = read_metrics(first)["bench/prompt_version"]
    prompt_file.write_text(PROMPT.format(template="Q: {question}"))
    try:
        run_cli(*bench_args(tiny_base, prompt_file), output_dir=tmp_path / "out", timeout=300)
    finally:
        prompt_file.write_text(PROMPT.format(template="{question}"))
    (second,) = run_dirs(tmp_path / "out" / "runs")
    version = read_metrics(second)["bench/prompt_version"]
    assert version != old_version
    assert {row["prompt_version"] for row in read_traces(second / TRACE_DB_NAME)} == {version}
    both = tmp_path / "both"
    shutil.copytree(first, both / "first")
    shutil.copytree(second, both / "second")
    run_cli("phase=report", f"report.source={both}", "logger=none", output_dir=tmp_path / "r")
    (report_dir,) = run_dirs(tmp_path / "r")
    report = read_metrics(report_dir)
    assert sorted(report["report/prompt_versions"]) == sorted([version, old_version])
    with (report_dir / "report.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert {(row["point"], row["prompt_version"]) for row in table} == {
        ("first", old_version),
        ("second", version),
    }


def planted_record(index: int, response: str, **fields) -> TraceRecord:
    record = {
        "request_id": f"r{index}",
        "time": 1_700_000_000.0 + index,
        "endpoint": "chat",
        "model": "m",
        "engine": "external",
        "run_id": "sft-lora-abc",
        "artifact_hash": "0123456789abcdef",
        "served_path": "m",
        "prompt_version": "p-1",
        "tag": "",
        "stream": True,
        "status": 200,
        "error": "",
        "latency_ms": 500.0,
        "ttft_ms": 50.0,
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "usage_source": "upstream",
        "finish_reason": "stop",
        "prompt": "[]",
        "prompt_hash": "h",
        "response": response,
        "params": "{}",
    }
    return TraceRecord(**(record | fields))


def plant(path: Path, records: list[TraceRecord]) -> None:
    store = TraceStore(path)
    for record in records:
        store.add(record)
    store.close()


def test_format_compliance_catches_planted_non_json_answers(tmp_path):
    answers = [
        '{"answer": 7}',
        ' {"answer": "seven", "why": "3 + 4"} ',
        '{"answer": 1}',
        '{"result": 7}',  # JSON, but not what the schema requires
        "The answer is 7.",
        '{"answer": 7',  # cut off
    ]
    records = [planted_record(i, text) for i, text in enumerate(answers)]
    records.append(planted_record(6, "I'm sorry, I cannot help with that."))
    records.append(planted_record(7, "", status=500, error="upstream 500: boom"))
    db = tmp_path / TRACE_DB_NAME
    plant(db, records)
    overrides = ["phase=report", f"report.source={db}", "logger=wandb", "monitor=json"]
    run_cli(*overrides, "monitor.slo_latency_ms=400", output_dir=tmp_path / "out")
    (run_dir,) = run_dirs(tmp_path / "out")
    metrics = read_metrics(run_dir)
    assert metrics["report/compliance"] == pytest.approx(3 / 7)
    assert metrics["report/refusal_rate"] == pytest.approx(1 / 7)
    assert metrics["report/errors"] == 1 and metrics["report/requests"] == 8
    assert metrics["report/slo_breach_rate"] == 1.0  # every request took 500 ms > 400 ms
    # the table and plots went to W&B (offline here): one run file in the run directory
    assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_costs_per_token_and_per_busy_hour(tmp_path):
    db = tmp_path / TRACE_DB_NAME
    # two overlapping requests (0-2 s, 1-3 s) and one alone (10-11 s): 4 busy seconds
    plant(
        db,
        [
            planted_record(0, "a", latency_ms=2000.0),
            planted_record(1, "b", latency_ms=2000.0),
            planted_record(10, "c", latency_ms=1000.0, prompt_version="p-2"),
        ],
    )
    per_token = ["cost=api", "cost.input_usd_per_1m=1.0", "cost.output_usd_per_1m=10.0"]
    run_cli("phase=report", f"report.source={db}", "logger=none", *per_token, output_dir=tmp_path)
    (run_dir,) = run_dirs(tmp_path / "runs")
    metrics = read_metrics(run_dir)
    assert metrics["cost/usd_total"] == pytest.approx(3 * (100 * 1.0 + 20 * 10.0) / 1e6)
    hourly = ["cost=gpu_hour", "cost.usd_per_hour=3600", "report.formats=[csv]"]
    run_cli("phase=report", f"report.source={db}", "logger=none", *hourly, output_dir=tmp_path)
    hourly_dir = next(d for d in run_dirs(tmp_path / "runs") if d != run_dir)
    metrics = read_metrics(hourly_dir)
    assert metrics["cost/busy_s"] == pytest.approx(4.0)
    assert metrics["cost/usd_total"] == pytest.approx(4.0)
    with (hourly_dir / "report.csv").open() as handle:
        costs = {row["prompt_version"]: float(row["cost_usd"]) for row in csv.DictReader(handle)}
    assert costs == pytest.approx({"p-1": 3.0, "p-2": 1.0})


def test_report_rejects_a_missing_source(tmp_path):
    result = run_cli("phase=report", "logger=none", output_dir=tmp_path, check=False)
    assert_rejected_early(result, "report.source")
    missing = tmp_path / "nowhere"
    result = run_cli("phase=report", f"report.source={missing}", output_dir=tmp_path, check=False)
    assert_rejected_early(result, f"report.source: {missing} does not exist")


class OTLPReceiver(BaseHTTPRequestHandler):
    """A local OTLP/HTTP collector: decodes each export request into spans."""

    spans: ClassVar[list] = []

    def do_POST(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        request = ExportTraceServiceRequest()
        request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                OTLPReceiver.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_traces_export_as_genai_spans_over_otlp(tmp_path):
    from lmstack.serving.traces import otlp_exporter

    server = HTTPServer(("127.0.0.1", 0), OTLPReceiver)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/traces"
        store = TraceStore(tmp_path / TRACE_DB_NAME, span_exporter=otlp_exporter(url))
        store.add(planted_record(0, "7", params=json.dumps({"max_tokens": 8})))
        store.close()
    finally:
        server.shutdown()
    (span,) = OTLPReceiver.spans
    attributes = {a.key: a.value for a in span.attributes}
    assert span.name == "chat m"
    assert attributes["gen_ai.operation.name"].string_value == "chat"
    assert attributes["gen_ai.request.model"].string_value == "m"
    assert attributes["gen_ai.usage.input_tokens"].int_value == 100
    assert attributes["gen_ai.usage.output_tokens"].int_value == 20
    assert attributes["gen_ai.request.max_tokens"].int_value == 8
    assert attributes["lmstack.prompt_version"].string_value == "p-1"
    assert (span.end_time_unix_nano - span.start_time_unix_nano) == pytest.approx(500e6)
    assert len(read_traces(tmp_path / TRACE_DB_NAME)) == 1
