"""eval=ifeval: lmstack's own prompt set runs on if-verifiable's checkers offline; controls
through a real OpenAI-compatible server (compliant answers score 1, empty ones 0); the figures
equal a direct computation with if-verifiable's own API; bad input exits 2."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest

from lmstack.config.groups.eval_ifeval import IFEvalConfig
from lmstack.errors import DataError
from lmstack.evaluation import ifeval

from conftest import assert_rejected_early, chat_answer, openai_server, run_cli, run_dirs

EVAL = ["phase=eval", "eval=ifeval", "logger=none"]
SHIPPED = [json.loads(line) for line in ifeval.SHIPPED_PROMPTS.read_text().splitlines()]


def shipped_prompts() -> list[ifeval.IFEvalPrompt]:
    return ifeval.selected_prompts(IFEvalConfig())


def test_every_shipped_instruction_is_a_known_checker_that_accepts_its_kwargs():
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    assert len(SHIPPED) >= 40
    assert len({row["key"] for row in SHIPPED}) == len(SHIPPED)
    kinds = {name for row in SHIPPED for name in row["instruction_id_list"]}
    assert len(kinds) >= 20
    assert not kinds & ifeval.NLTK_DATA_NEEDED.keys()  # nothing that needs a download
    for row in SHIPPED:
        assert set(row) == {"key", "prompt", "instruction_id_list", "kwargs", "compliant_response"}
        assert len(row["kwargs"]) == len(row["instruction_id_list"])
        for name, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
            checker = INSTRUCTION_DICT[name](name)
            arguments = set(inspect.signature(checker.build_description).parameters)
            assert set(kwargs) == arguments, (row["key"], name)
            checker.build_description(**kwargs)  # every argument given: none drawn at random
    assert len(shipped_prompts()) == len(SHIPPED)


def test_checkers_on_known_good_and_bad_responses():
    by_ids = {tuple(p.instruction_ids): p for p in shipped_prompts()}
    no_comma = by_ids[("punctuation:no_comma",)]
    assert ifeval.followed(no_comma, "Bread then cheese then bread.") == [(True, True)]
    assert ifeval.followed(no_comma, "Bread, cheese, bread.") == [(False, False)]
    json_format = by_ids[("detectable_format:json_format",)]
    assert ifeval.followed(json_format, '{"capital": "Paris"}') == [(True, True)]
    # a chatty first line breaks strict JSON, not loose (IFEval drops the first line)
    assert ifeval.followed(json_format, 'Here it is:\n{"capital": "Paris"}') == [(False, True)]
    assert ifeval.followed(json_format, "Paris is the capital.") == [(False, False)]
    lowercase_no_comma = by_ids[("change_case:english_lowercase", "punctuation:no_comma")]
    answer = "i liked the film about the sea and the music was lovely to hear."
    assert ifeval.followed(lowercase_no_comma, answer) == [(True, True), (True, True)]
    assert ifeval.followed(lowercase_no_comma, "I liked it, a lot.") == [(False, False)] * 2
    # an empty answer follows nothing, not even "no commas"
    assert ifeval.followed(no_comma, "  ") == [(False, False)]


def test_the_figures_equal_if_verifiables_own_computation():
    from if_verifiable import IFEvalSample, evaluate_output_for_sample

    prompts = shipped_prompts()
    # compliant, empty, and compliant behind a chatty first line (strict fails, loose may pass)
    responses = [
        [row["compliant_response"], "", "Sure! Here you go:\n" + row["compliant_response"]][i % 3]
        for i, row in enumerate(SHIPPED)
    ]
    ifeval.seed_language_detection()
    verdicts = [[ifeval.followed(p, r)] for p, r in zip(prompts, responses)]
    figures = ifeval.ifeval_figures(prompts, verdicts, 0.95)
    theirs = [
        evaluate_output_for_sample(
            "ifeval", IFEvalSample(r["key"], r["prompt"], r["instruction_id_list"], r["kwargs"]),
            response,
        )
        for r, response in zip(SHIPPED, responses)
    ]  # fmt: skip
    instructions = sum(len(r["instruction_id_list"]) for r in SHIPPED)
    for mode in ("strict", "loose"):
        prompt_level = sum(getattr(s, f"binary_{mode}") for _, s in theirs) / len(theirs)
        followed = sum(getattr(i, f"{mode}_pass") for results, _ in theirs for i in results)
        assert figures[f"ifeval/prompt_{mode}"] == pytest.approx(prompt_level, abs=1e-12)
        assert figures[f"ifeval/instruction_{mode}"] == pytest.approx(
            followed / instructions, abs=1e-12
        )
    # a real mix: neither degenerate, and loose forgives what strict does not
    assert 0 < figures["ifeval/prompt_strict"] < figures["ifeval/prompt_loose"] < 1


def test_served_controls_compliant_answers_score_one_and_empty_ones_zero(tmp_path):
    """One endpoint, two "models" asked in a two-point sweep: `compliant` answers each prompt
    with its compliant response, `empty` with nothing."""
    by_prompt = {row["prompt"]: row for row in SHIPPED}
    asked: dict[str, list[str]] = {"compliant": [], "empty": []}

    def reply(body, headers):
        (message,) = body["messages"]  # the prompt as written: no system message, no shots
        asked[body["model"]].append(message["content"])
        row = by_prompt[message["content"]]
        return chat_answer(row["compliant_response"] if body["model"] == "compliant" else "")

    with openai_server("compliant", reply) as base_url:
        run_cli(
            "-m",
            *EVAL,
            "eval.target=served",
            "serving=external",
            f"serving.base_url={base_url}",
            "serving.served_model_name=compliant,empty",
            "eval.concurrency=8",
            output_dir=tmp_path,
        )
    runs = {served_model(run_dir): run_dir for run_dir in run_dirs(tmp_path)}
    assert sorted(asked["compliant"]) == sorted(asked["empty"]) == sorted(by_prompt)
    compliant, samples = (
        json.loads((runs["compliant"] / "metrics.json").read_text()),
        [json.loads(line) for line in (runs["compliant"] / "ifeval_samples.jsonl").open()],
    )
    assert compliant["ifeval/prompt_strict"] == compliant["ifeval/instruction_strict"] == 1.0
    assert compliant["ifeval/prompt_loose"] == 1.0 and compliant["eval/score"] == 1.0
    assert compliant["ifeval/ci_high"] == 1.0 and 0.9 < compliant["ifeval/ci_low"] < 1.0
    assert compliant["ifeval/n"] == len(SHIPPED)
    assert compliant["ifeval/instruction/punctuation:no_comma"] == 1.0
    assert [s["completion"] for s in samples] == [row["compliant_response"] for row in SHIPPED]
    assert all(s["score"] == 1.0 for s in samples)
    empty = json.loads((runs["empty"] / "metrics.json").read_text())
    assert empty["ifeval/prompt_strict"] == empty["ifeval/instruction_strict"] == 0.0
    assert empty["ifeval/prompt_loose"] == empty["ifeval/instruction_loose"] == 0.0
    assert empty["ifeval/ci_low"] == 0.0 and empty["eval/score"] == 0.0


def served_model(run_dir: Path) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / "config.yaml").serving.served_model_name


def test_an_unknown_instruction_id_in_a_prompt_file_is_named(tmp_path):
    prompts = tmp_path / "mine.jsonl"
    row = {"key": 7, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_coma"],
           "kwargs": [{}]}  # fmt: skip
    prompts.write_text(json.dumps(SHIPPED[0]) + "\n" + json.dumps(row) + "\n")
    result = run_cli(*EVAL, f"eval.ifeval.prompts={prompts}", output_dir=tmp_path, check=False)
    assert_rejected_early(
        result,
        f"{prompts}:2",
        "key 7",
        "'punctuation:no_coma'",
        "did you mean punctuation:no_comma",
    )


def test_prompts_a_checker_would_score_at_random_are_refused(tmp_path):
    def rejection(row: dict) -> str:
        path = tmp_path / "mine.jsonl"
        path.write_text(json.dumps({"key": 3, "prompt": "Describe a cat."} | row) + "\n")
        with pytest.raises(DataError) as error:
            ifeval.selected_prompts(IFEvalConfig(prompts=str(path)))
        assert f"{path}:1" in str(error.value)
        return str(error.value)

    # a missing argument would be drawn at random by the checker
    words = {"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{}]}
    assert "takes the kwargs ['num_words', 'relation'], got none" in rejection(words)
    bad_relation = {"num_words": 5, "relation": "exactly"}
    refused = rejection(words | {"kwargs": [bad_relation]})
    assert "refuses its kwargs" in refused and "exactly" in refused
    assert "one object per instruction" in rejection(words | {"kwargs": []})
    if ifeval.nltk_data_missing("length_constraints:number_sentences"):
        sentences = {"num_sentences": 2, "relation": "less than"}
        needs = rejection(
            {"instruction_id_list": ["length_constraints:number_sentences"], "kwargs": [sentences]}
        )
        assert "tokenizers/punkt" in needs and "does not download" in needs


def test_the_missing_wheel_is_named(tmp_path):
    # a real interpreter where `import if_verifiable` fails, as without the wheel
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['if_verifiable'] = None\n")
    path = os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))
    result = run_cli(*EVAL, output_dir=tmp_path / "out", check=False, env={"PYTHONPATH": path})
    assert_rejected_early(result, "eval=ifeval", "if-verifiable", "pip install")


@pytest.mark.slow  # 41 answers of up to 512 tokens: ~15 min of CPU, so not in CI's suite
def test_smollm2_prints_its_instruction_following_score(tmp_path):
    result = run_cli(*EVAL, "model=smollm2_135m", output_dir=tmp_path, timeout=3600)
    assert "not the official IFEval set" in result.stdout
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["ifeval/n"] == len(SHIPPED)
    assert metrics["ifeval/ci_low"] <= metrics["ifeval/prompt_strict"] <= metrics["ifeval/ci_high"]
    assert metrics["ifeval/prompt_strict"] <= metrics["ifeval/prompt_loose"]
    print(
        f"SmolLM2-135M-Instruct, lmstack's IFEval-style prompts ({metrics['ifeval/n']}): "
        f"prompt strict {metrics['ifeval/prompt_strict']:.4f} "
        f"[{metrics['ifeval/ci_low']:.4f}, {metrics['ifeval/ci_high']:.4f}], instruction strict "
        f"{metrics['ifeval/instruction_strict']:.4f}, prompt loose "
        f"{metrics['ifeval/prompt_loose']:.4f}, instruction loose "
        f"{metrics['ifeval/instruction_loose']:.4f}"
    )
