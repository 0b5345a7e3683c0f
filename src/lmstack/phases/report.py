"""phase=report: what was served, how fast, at what cost and quality, from traces.

Reads top to bottom: find the trace stores under `report.source` (one traces.sqlite,
a run directory, or a sweep directory with one store per point) → group the traces
per sweep point, model (run identity or artifact hash) and prompt version → per group:
requests, errors, p50/p99 latency and TTFT, tokens, cost, format compliance,
refusals, empty and truncated answers, SLO breaches → report.md / report.csv, PNG
plots, metrics.json and W&B.

    python run.py phase=report report.source=outputs/sweeps/<sweep> monitor=json

The report always re-reads its source: traces keep arriving while a store is in use.

Deferred imports, for start-up time: matplotlib and numpy (and the lmstack modules that load
them) are imported inside the functions that need them; the CLI's input checks import this
module first.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError, DataError
from lmstack.phases.context import RunContext
from lmstack.serving import ab, costs, lineage, monitors, promotion
from lmstack.serving.traces import find_trace_dbs, read_feedback, read_traces
from lmstack.tracking.loggers import log_results
from lmstack.tracking.run_dir import set_status, write_json
from lmstack.util.tables import markdown_table

GROUP_KEYS = ("point", "model", "prompt_version")
PERCENTILES = (50, 90, 99)


def run(ctx: RunContext) -> dict[str, Any]:
    config, run_dir = ctx.config, ctx.run_dir
    rows = collect_rows(Path(config.report.source), config.report.include_warmup)
    table = summary_table(rows, config.cost, config.monitor)
    metrics = totals(rows, config.cost, config.monitor) | {"report/groups": len(table)}
    written = write_tables(table, run_dir, config.report.formats)
    images = plot_table(table, rows, run_dir) if config.report.plots else {}
    ab_metrics, ab_text, ab_images = ab_section(Path(config.report.source), rows, config, run_dir)
    if ab_text:
        metrics |= ab_metrics
        images |= ab_images
        if "md" in config.report.formats:
            with (run_dir / "report.md").open("a") as handle:
                handle.write("\n" + ab_text)
    metrics["report/files"] = [str(p) for p in [*written, *images.values()]]

    log_results(ctx, metrics, tables={"report/table": table}, images=images)
    write_json(run_dir / "metrics.json", metrics)
    set_status(run_dir, "finished")
    print(markdown(table))
    if ab_text:
        print("\n" + ab_text)
    return metrics


# ---- reading ----


def collect_rows(source: Path, include_warmup: bool) -> list[dict[str, Any]]:
    """Every trace under `source`, each tagged with its sweep point (the store's folder)."""

    if not source.exists():
        raise ConfigError(f"report.source: {source} does not exist")
    dbs = find_trace_dbs(source)
    if not dbs:
        raise DataError(f"report.source: no traces.sqlite under {source}")
    rows = []
    for db in dbs:
        point = "" if source.is_file() else str(db.parent.relative_to(source))
        for row in read_traces(db, include_warmup=include_warmup):
            rows.append({**row, "point": "" if point == "." else point, "model": model_label(row)})
    if not rows:
        raise DataError(f"report.source: the trace stores under {source} hold no requests")
    return rows


def model_label(row: dict[str, Any]) -> str:
    """The run identity of what was served, else its folder name and artifact hash."""
    if row.get("run_id"):
        return row["run_id"]
    served = row.get("served_path") or row["model"]
    name = Path(served).name or served
    return f"{name}@{row['artifact_hash'][:8]}" if row.get("artifact_hash") else name


# ---- summarizing ----


def summary_table(rows: list[dict[str, Any]], cost: Any, monitor: Any) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[key] for key in GROUP_KEYS)].append(row)
    return [
        dict(zip(GROUP_KEYS, key)) | group_figures(members, cost, monitor)
        for key, members in sorted(groups.items())
    ]


def group_figures(rows: list[dict[str, Any]], cost: Any, monitor: Any) -> dict[str, Any]:
    done = [row for row in rows if monitors.succeeded(row)]
    spent = costs.summarize(rows, cost)
    figures: dict[str, Any] = {
        "requests": len(rows),
        "completed": len(done),
        "errors": len(rows) - len(done),
        "prompt_tokens": sum(row["prompt_tokens"] or 0 for row in done),
        "completion_tokens": sum(row["completion_tokens"] or 0 for row in done),
    }
    figures |= percentiles("latency_ms", [row["latency_ms"] for row in done])
    ttfts = [row["ttft_ms"] for row in done if row["ttft_ms"] is not None]
    figures |= percentiles("ttft_ms", ttfts)
    figures |= {
        "cost_usd": spent["cost/usd_total"],
        "cost_usd_per_request": spent["cost/usd_per_request"],
    }
    figures |= monitors.summarize(rows, monitor)
    return figures


def percentiles(name: str, values: list[float]) -> dict[str, float | None]:
    import numpy as np

    if not values:
        return {f"{name}_p{q}": None for q in PERCENTILES}
    return {f"{name}_p{q}": float(np.percentile(values, q)) for q in PERCENTILES}


def totals(rows: list[dict[str, Any]], cost: Any, monitor: Any) -> dict[str, Any]:
    """The whole source as one group: report/... and cost/... figures."""

    figures = group_figures(rows, cost, monitor)
    metrics = {f"report/{key}": value for key, value in figures.items()}
    metrics |= costs.summarize(rows, cost)
    metrics["report/prompt_versions"] = sorted({row["prompt_version"] for row in rows})
    metrics["report/models"] = sorted({row["model"] for row in rows})
    return metrics


# ---- writing ----


def write_tables(table: list[dict[str, Any]], run_dir: Path, formats: list[str]) -> list[Path]:
    written = []
    if "md" in formats:
        path = run_dir / "report.md"
        path.write_text(markdown(table) + "\n")
        written.append(path)
    if "csv" in formats:
        path = run_dir / "report.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        written.append(path)
    return written


def markdown(table: list[dict[str, Any]]) -> str:
    columns = list(table[0])
    return markdown_table(columns, ([_cell(row[c]) for c in columns] for row in table))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return str(value) or "-"


def plot_table(
    table: list[dict[str, Any]], rows: list[dict[str, Any]], run_dir: Path
) -> dict[str, Path]:
    """Latency per group (p50 bar, p99 whisker), cost per request, and latency over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [" / ".join(str(row[k]) for k in GROUP_KEYS if row[k]) or "all" for row in table]
    images = {}
    figure, (latency, cost) = plt.subplots(1, 2, figsize=(12, 0.6 * len(table) + 2.5))
    p50 = [row["latency_ms_p50"] or 0 for row in table]
    p99 = [row["latency_ms_p99"] or 0 for row in table]
    latency.barh(labels, p50, xerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99)]])
    latency.set_xlabel("latency ms (bar p50, whisker p99)")
    cost.barh(labels, [row["cost_usd_per_request"] for row in table])
    cost.set_xlabel("USD per request")
    cost.set_yticks([])
    figure.tight_layout()
    images["report/latency_cost"] = _save(figure, run_dir / "report_latency_cost.png")
    figure, axis = plt.subplots(figsize=(8, 4))
    start = min(row["time"] for row in rows)
    for label, key in zip(labels, table):
        members = [r for r in rows if all(r[k] == key[k] for k in GROUP_KEYS)]
        axis.plot([r["time"] - start for r in members], [r["latency_ms"] for r in members], ".")
        axis.lines[-1].set_label(label)
    axis.set_xlabel("seconds since the first request")
    axis.set_ylabel("latency ms")
    axis.legend(fontsize="small")
    figure.tight_layout()
    images["report/latency_over_time"] = _save(figure, run_dir / "report_latency_over_time.png")
    return images


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ---- A/B tests (serving.ab) ----


def ab_section(
    source: Path, rows: list[dict[str, Any]], config: Any, run_dir: Path
) -> tuple[dict[str, Any], str, dict[str, Path]]:
    """Per variant figures and each variant against the control, when the traces hold an A/B
    test; ({}, "", {}) otherwise."""

    if not any(row.get("variant") for row in rows):
        return {}, "", {}
    dbs = find_trace_dbs(source)
    feedback = [entry for db in dbs for entry in read_feedback(db)]
    variants = ab.read_variants(dbs)  # ab_variants.json, read once
    weights = ab.weight_shares(variants)
    table = ab.variant_table(rows, feedback, config.cost, config.monitor, weights)
    compared = ab.comparisons(rows, feedback, next(iter(weights), "") if weights else "")
    srm = (
        ab.sample_ratio_p(
            [row["requests"] for row in table], [weights[row["variant"]] for row in table]
        )
        if weights and all(row["variant"] in weights for row in table)
        else None
    )
    metrics: dict[str, Any] = {"ab/srm_p": srm}
    for row in table:
        for key, value in row.items():
            if key != "variant":
                metrics[f"ab/{row['variant']}/{key}"] = value
    for row in compared:
        for key in ("diff", "diff_ci_low", "diff_ci_high", "z", "p"):
            metrics[f"ab/{row['variant']}_vs_{row['control']}/{key}"] = row.get(key)
    modes = {entry["name"]: entry.get("mode") for entry in variants}
    metrics |= {f"ab/{name}/served_as": mode for name, mode in modes.items()}
    found = lineage.chains(variants)
    text = ab.report_markdown(table, compared, srm, modes) + lineage.lineage_markdown(found)
    registered, decision = promotion.read_rule(dbs), None
    if registered:
        decision = promotion.judge(registered, rows, feedback, table, config.monitor)
        write_json(run_dir / "promotion.json", decision)
        metrics["ab/promotion/decision"] = decision["decision"]
        metrics["ab/promotion/winner"] = decision["winner"]
        text += "\n" + promotion.markdown(decision)
    images = {}
    if config.report.plots:
        images["report/ab_feedback"] = ab.plot_feedback(table, run_dir / "report_ab_feedback.png")
        if found:
            chain = lineage.plot_chain(found, table, decision, run_dir / "report_ab_chain.png")
            images["report/ab_chain"] = chain
            text += f"\n![the chain: served -> harvest -> trained -> A/B]({chain.name})\n"
    return metrics, text, images
