"""eval.data: the user's own rows through the suites, bad input, nothing silent, and the
eval-suite plug-in interface (a toy suite from a temporary module).

The user's task (tests/user_task.py) is not arithmetic: "To JSON: name=Ann age=3 item=pens"
-> {"name": "Ann", "age": 3, "item": "pens"}. The planted judge is a real OpenAI-compatible
HTTP server in this process that grades JSON answers against the reference in the prompt.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
from user_task import SCHEMA, write_rows

from conftest import REPO, chat_answer, openai_server, run_cli, run_dirs

QUIET = ("logger=none", "trainer.num_threads=1", "trainer.enable_progress_bar=false")
REFERENCE = re.compile(
    r"\[Reference answer\]\n(?P<ref>.*?)\n\n\[The assistant's answer\]\n(?P<a>.*)", re.S
)
REQUEST = re.compile(r"\[Request\]\n(?P<q>.*?)\n\n")


def json_of(text: str):
    from lmstack.data.scoring import first_json_object

    return first_json_object(text)


def verdict(mode: str, user: str) -> str:
    if mode == "prose":
        return "The answer looks fine to me."
    if graded := REFERENCE.search(user):
        good = json_of(graded["a"]) == json.loads(graded["ref"])
        return "Rating: [[10]]" if good else "Rating: [[1]]"
    # pairwise: the answer that is JSON at all wins; both or neither: a tie
    first, second = user.split("[Assistant B's answer]")
    a, b = json_of(first.split("[Assistant A's answer]")[-1]), json_of(second)
    return "[[C]]" if (a is None) == (b is None) else "[[A]]" if a is not None else "[[B]]"


@contextlib.contextmanager
def judge_server(mode: str):
    """A planted OpenAI-compatible judge on a free port; the user messages it saw."""
    seen: list[str] = []

    def reply(request: dict, headers: dict) -> dict:
        user = request["messages"][-1]["content"]
        seen.append(user)
        return chat_answer(verdict(mode, user))

    with openai_server(f"planted-{mode}", reply) as url:
        yield url, seen


def evaluate(output_dir: Path, *args: str, check: bool = True):
    return run_cli("phase=eval", *args, *QUIET, output_dir=output_dir, check=check)


def only_run(output_dir: Path) -> Path:
    (run_dir,) = run_dirs(output_dir)
    return run_dir


def schema_file(folder: Path) -> Path:
    path = folder / "answer.schema.json"
    path.write_text(SCHEMA)
    return path


def samples(run_dir: Path, suite: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"{suite}_samples.jsonl").open()]


@pytest.fixture(scope="module")
def user_rows(tmp_path_factory) -> tuple[Path, Path]:
    return write_rows(tmp_path_factory.mktemp("rows"), train=400, held_out=12)


def test_every_suite_asks_the_users_prompts(tmp_path, user_rows, tiny_base):
    """verifier (JSON fields), format (JSON schema), judge (reference-guided, and pairwise
    against the base), arena, faithfulness (rows with a context), lm-eval (a task made from the
    rows): every prompt the model, the judge, the arena and the harness saw is one of the
    user's rows, and each suite saves its samples."""
    _, held_out = user_rows
    prompts = [json.loads(line)["prompt"] for line in held_out.open()]
    with judge_server("oracle") as (url, seen):
        evaluate(
            tmp_path,
            "eval=[verifier,format,judge,arena,faithfulness,lm_eval]",
            f"eval.data.path={held_out}",
            "eval.scorer.name=json_fields",
            f"eval.format.json_schema={schema_file(tmp_path)}",
            f"eval.judge.base_url={url}",
            "eval.judge.compare_to=base",
            f"eval.arena.models=[base,{tiny_base}]",
            "eval.arena.num_prompts=6",
            "eval.arena.bootstrap_rounds=50",
            "eval.max_new_tokens=24",
        )
    run_dir = only_run(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval/data"] == str(held_out) and metrics["eval/rows"] == 12
    assert metrics["verifier/scorer"] == "json_fields" and metrics["verifier/n"] == 12
    assert metrics["eval/score_metric"] == "verifier/score"
    assert isinstance(metrics["eval/score"], float)
    assert metrics["format/json_schema_rate"] is not None and metrics["format/n"] == 12
    assert metrics["judge/n"] == 12 and metrics["judge/parse_failures"] == 0
    assert metrics["judge/win_rate"] == 0.5  # the same model on both sides: all ties
    assert metrics["arena/battles"] == 6
    assert metrics["faithfulness/n"] == 12 and metrics["faithfulness/method"] == "support"
    assert isinstance(metrics["faithfulness/support_rate"], float)
    # lm-eval runs a generative exact-match task written from the user's rows
    assert metrics["lm_eval/score_metric"].endswith("/exact_match"), metrics["lm_eval/score_metric"]
    assert metrics["lm_eval/score"] == 0.0  # the untuned base writes no JSON
    suites = ("verifier", "format", "judge", "judge_pairwise", "arena", "faithfulness", "lm_eval")
    for suite in suites:
        rows = samples(run_dir, suite)
        assert rows and {row["prompt"] for row in rows} <= set(prompts), suite
    verifier = samples(run_dir, "verifier")
    assert verifier[0]["reference"] == json.loads(held_out.open().readline())["reference"]
    assert {"completion", "score"} <= set(verifier[0])
    # 12 single grades + 12 pairs in both orders; each names one of the user's prompts
    assert len(seen) == 12 + 24
    asked = {REQUEST.search(message)["q"] for message in seen}
    assert asked == set(prompts)


def test_unparseable_judge_warns_and_exits_non_zero_keeping_its_results(tmp_path, user_rows):
    _, held_out = user_rows
    with judge_server("prose") as (url, _):
        result = evaluate(
            tmp_path,
            "eval=judge",
            f"eval.data.path={held_out}",
            f"eval.judge.base_url={url}",
            "eval.max_new_tokens=8",
            check=False,
        )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "12 of 12 judge verdicts could not be parsed" in result.stdout
    assert "lmstack: warning: no value for judge/score" in result.stdout
    assert "eval/score: the headline metric judge/score could not be computed" in result.stderr
    assert "Traceback" not in result.stderr
    run_dir = only_run(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["judge/parse_failures"] == 12 and metrics["judge/score"] is None
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


def test_bad_eval_data_exits_2_naming_file_line_or_key(tmp_path, user_rows):
    _, held_out = user_rows
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(held_out.read_text().splitlines()[0] + "\n{not json\n")
    unreferenced = tmp_path / "unreferenced.jsonl"
    unreferenced.write_text('{"prompt": "To JSON: name=Ann age=3 item=pens"}\n')
    cases = [
        ((f"eval.data.path={malformed}",), f"{malformed}:2: malformed JSON"),
        (
            (f"eval.data.path={unreferenced}", "eval.scorer.name=json_fields"),
            f"{unreferenced}:1: row has no 'reference'",
        ),
        (
            (f"eval.data.path={held_out}", "eval.scorer.name=no_such_pkg.scoring:grade"),
            "eval.scorer.name: cannot import module 'no_such_pkg.scoring'",
        ),
        (
            (f"eval.data.path={held_out}", "eval=format"),
            "eval.format: nothing to check on your rows",
        ),
    ]
    for index, (overrides, fragment) in enumerate(cases):
        result = evaluate(tmp_path / str(index), *overrides, check=False)
        assert result.returncode == 2, (fragment, result.stderr[-2000:])
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


TOY_MODULE = """
from dataclasses import dataclass

from lmstack.evaluation.suites import Suite, register


@dataclass
class ToyOptions:
    per_row: float = 0.01


def run(session):
    rows = session.rows()
    per_row = session.options("toy").per_row
    session.samples("toy", [{**row.record(), "score": per_row} for row in rows])
    return {"toy/score": per_row * len(rows), "toy/n": len(rows)}


register(Suite("toy", run, headline="toy/score", rank=5, schema=ToyOptions))
"""
TOY_YAML = """# A toy suite from outside lmstack: one module, one schema, this file.
defaults:
  - schema
  - _self_
suites: {toy: true}
plugins: [toy_suite]
"""


def test_a_suite_is_one_module_one_schema_one_yaml(tmp_path, user_rows):
    _, held_out = user_rows
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "toy_suite.py").write_text(TOY_MODULE)
    (tmp_path / "conf" / "eval").mkdir(parents=True)
    (tmp_path / "conf" / "eval" / "toy.yaml").write_text(TOY_YAML)
    common = (
        "eval=toy",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        f"eval.data.path={held_out}",
    )
    env = {"PYTHONPATH": f"{tmp_path / 'plugin'}:{REPO / 'src'}"}
    run_cli(
        "phase=eval",
        *common,
        "+eval.options.toy.per_row=0.5",
        *QUIET,
        output_dir=tmp_path / "ok",
        env=env,
    )
    metrics = json.loads((only_run(tmp_path / "ok") / "metrics.json").read_text())
    assert metrics["eval/suites"] == ["toy"] and metrics["toy/n"] == 12
    assert metrics["eval/score"] == 6.0 and metrics["eval/score_metric"] == "toy/score"
    assert len(samples(only_run(tmp_path / "ok"), "toy")) == 12
    bad = run_cli(
        "phase=eval",
        *common,
        "+eval.options.toy.per_row=lots",
        *QUIET,
        output_dir=tmp_path / "bad",
        env=env,
        check=False,
    )
    assert bad.returncode == 2 and "eval.options.toy" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.slow
def test_user_task_recipe_compares_fine_tuning_with_prompting(tmp_path, user_rows):
    """recipe=user_task_sft on the user's JSON task: the base zero-shot and few-shot (3 solved
    training rows before each prompt), 300 full fine-tuning steps, then the tuned model in
    process and served, in one comparison table. Measured by hand with the same recipe on 24
    held-out rows: JSON-field score 0.00 (zero-shot), 0.00 (few-shot) -> 0.51 tuned, in process
    and served alike; JSON-schema compliance 0.00 -> 1.00. Asked here (12 rows): tuned >= base
    + 0.25 on both. ~6 min on 2 cores (9.5 min measured with the machine shared)."""
    train, held_out = user_rows
    schema = schema_file(tmp_path)
    result = run_cli(
        "recipe=user_task_sft",
        f"data.path={train}",
        f"eval.data.path={held_out}",
        "eval.scorer.name=json_fields",
        f"eval.format.json_schema={schema}",
        *QUIET,
        output_dir=tmp_path / "out",
        timeout=1500,
    )
    (pipeline,) = [d for d in run_dirs(tmp_path / "out") if d.name.startswith("pipeline")]
    metrics = json.loads((pipeline / "metrics.json").read_text())
    zero, few = metrics["base_zero_shot/eval/score"], metrics["base_few_shot/eval/score"]
    tuned, served = metrics["sft_eval/eval/score"], metrics["sft_served/eval/score"]
    assert tuned >= max(zero, few) + 0.25, metrics
    assert metrics["sft_eval/format/rate"] >= metrics["base_zero_shot/format/rate"] + 0.25
    assert abs(served - tuned) <= 1 / 12, (served, tuned)  # one row in 12
    table = (pipeline / "comparison.md").read_text()
    for stage in ("base_zero_shot", "base_few_shot", "sft_eval", "sft_served"):
        assert f"| {stage} |" in table, table
    assert "plain+3shot" in table  # the few-shot prompting baseline row
    assert "lmstack: the pipeline's evaluations" in result.stdout


def test_reference_scorers_by_hand():
    from lmstack.data.scoring import build_scorer, normalize

    assert normalize("The  Answer: Paris!") == "answer paris"
    exact, normalized = build_scorer("exact", "k"), build_scorer("normalized", "k")
    assert exact(" Paris ", "Paris", {}) == 1.0 and exact("paris", "Paris", {}) == 0.0
    assert normalized("the paris.", "Paris", {}) == 1.0
    numeric = build_scorer("numeric", "k", tolerance=0.01)
    assert numeric("about 3.14", "3.1416", {}) == 1.0 and numeric("3.3", "3.1416", {}) == 0.0
    fields = build_scorer("json_fields", "k")
    reference = {"name": "Ann", "age": 3}
    assert fields('Sure: {"name": "Ann", "age": 3}', reference, {}) == 1.0
    assert fields('{"name": "Ann", "age": "3"}', reference, {}) == 0.5  # a string is not 3
    assert fields("no json here", reference, {}) == 0.0
    only_name = build_scorer("json_fields", "k", fields=["name"])
    assert only_name('{"name": "Ann", "age": 4}', json.dumps(reference), {}) == 1.0
    own = build_scorer("builtins:slice", "eval.scorer.name")  # any importable callable
    with pytest.raises(Exception, match=re.escape("the scorer 'builtins:slice' returned slice")):
        own("a", "b", {})


def test_the_registry_holds_every_builtin_suite_the_schema_names():
    import lmstack.evaluation.builtin_suites  # noqa: F401  (registers the built-in suites)
    from lmstack.config.groups.eval import EVAL_SUITES
    from lmstack.evaluation.suites import REGISTRY

    assert set(EVAL_SUITES) <= set(REGISTRY)
    for suite in REGISTRY.values():
        assert suite.schema is not None and callable(suite.run)


@pytest.mark.slow  # an unknown task makes the harness index its thousands of tasks (~60 s)
def test_a_broken_lm_eval_task_file_is_named_with_its_key(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(
        "task: my_json_task\ndataset_path: json\noutput_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{reference}}'\n"
        "metric_list:\n  - metric: exact_matchh\n"
    )
    (tasks / "typo.yaml").write_text("task: my_other_task\ndataset_path: json\n  oops: [\n")
    for task, fragments in (
        ("my_json_task", (f"in {tasks / 'mine.yaml'} cannot be built", "exact_matchh")),
        ("my_other_task", (f"cannot be read: {tasks / 'typo.yaml'}: line 3",)),
    ):
        result = evaluate(
            tmp_path / task,
            "eval=lm_eval",
            f"eval.lm_eval.tasks=[{task}]",
            f"eval.lm_eval.include_paths=[{tasks}]",
            check=False,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        for fragment in fragments:
            assert fragment in result.stderr, (fragment, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_lm_eval_samples_keep_the_sent_prompt_and_the_reply_before_filters():
    """A user's task has no `question` field: the sample shows the prompt the harness sent;
    a generative reply is kept as given beside the filtered completion that was scored."""
    from lmstack.evaluation.lm_eval_bridge import samples_table

    generated = {
        "doc": {"a": 17, "b": 25},
        "target": "42",
        "arguments": [("<|im_start|>user\nWhat is 17 plus 25?", {"until": ["\n"]})],
        "resps": [["ANSWER: 41"]],
        "filtered_resps": ["41"],
        "exact_match": 0.0,
    }
    scored = {
        "doc": {"question": "2 + 2?"},
        "target": 1,
        "arguments": {"gen_args_0": {"arg_0": "2 + 2?", "arg_1": " 4"}},
        "resps": [[[-0.5, True]], [[-2.0, False]]],
        "filtered_resps": [[-0.5, True], [-2.0, False]],
        "acc": 1.0,
    }
    (gen_row,) = samples_table({"samples": {"mine": [generated]}})
    assert gen_row["prompt"].endswith("What is 17 plus 25?")
    assert (gen_row["completion"], gen_row["reply"], gen_row["score"]) == ("41", "ANSWER: 41", 0.0)
    (scored_row,) = samples_table({"samples": {"mc": [scored]}})
    assert scored_row["prompt"] == "2 + 2?" and "reply" not in scored_row
    del scored["doc"]["question"]
    (scored_row,) = samples_table({"samples": {"mc": [scored]}})
    assert scored_row["prompt"] == "2 + 2?"  # from the harness's saved arguments
