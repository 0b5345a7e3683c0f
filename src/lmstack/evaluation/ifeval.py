"""eval=ifeval: instruction following, IFEval style, each answer checked by if-verifiable's
IFEval checkers.

The prompts are lmstack's own (ifeval_prompts.jsonl beside this module, in IFEval's input
format: key, prompt, instruction_id_list, kwargs), or the user's file (eval.ifeval.prompts).
They are NOT the official IFEval prompts, which no wheel ships: scores on them are not
comparable to published IFEval figures. The model under test (in process or served) answers
each prompt through its chat template, as it is, with no system message or examples of the
`prompt` group (those would be instructions of their own).

Each instruction is checked by its if-verifiable checker, built from the prompt's kwargs (every
argument given: a checker draws a missing one at random). IFEval's figures (Zhou et al. 2023):

- `ifeval/prompt_strict` (the headline): the share of prompts whose every instruction is
  followed, with a Wilson interval over prompts at eval.confidence;
- `ifeval/instruction_strict`: the share of all instructions followed;
- `ifeval/prompt_loose`, `ifeval/instruction_loose` (eval.ifeval.loose): the same, an
  instruction counting as followed when any of IFEval's loose variants of the answer (first
  and/or last line removed, markdown asterisks stripped) follows it;
- `ifeval/instruction/<id>`: the strict share per instruction id.

An empty answer follows nothing. Checkers that need NLTK's punkt data, which no wheel ships and
lmstack never downloads, are refused with a message (NLTK_DATA_NEEDED); language checks run on
langdetect's shipped profiles, seeded so that a verdict is the same on every run. Per-prompt
samples go to ifeval_samples.jsonl.

Deferred imports, for start-up time: if_verifiable (nltk, langdetect) is imported inside the
functions that need it.
"""

from __future__ import annotations

import difflib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.config.groups.eval_ifeval import IFEvalConfig
from lmstack.config.groups.prompt import PromptConfig
from lmstack.errors import ConfigError, DataError
from lmstack.evaluation.humaneval import retargeted
from lmstack.evaluation.suites import Inputs, Session, Suite, register
from lmstack.tracking.identity import stable_hash
from lmstack.util.stats import wilson_interval

# lmstack's own prompt set (package data)
SHIPPED_PROMPTS = Path(__file__).with_name("ifeval_prompts.jsonl")
# the prompt exactly as written: no system message, no few-shot turns
AS_WRITTEN = PromptConfig(name="ifeval", system="", template="{question}")
# checkers that read NLTK data no wheel ships (nltk.data.find names it); never downloaded
NLTK_DATA_NEEDED = {
    "length_constraints:number_sentences": "tokenizers/punkt",
    "change_case:capital_word_frequency": "tokenizers/punkt_tab",
}
REQUIRED_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")


@dataclass(frozen=True)
class IFEvalPrompt:
    key: Any
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]
    where: str  # file:line

    def record(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "prompt": self.prompt,
            "instruction_id_list": list(self.instruction_ids),
            "kwargs": [dict(k) for k in self.kwargs],
        }


# ---------------------------------------------------------------- the checkers


def checker_registry() -> dict[str, type]:
    """if-verifiable's IFEval checkers by instruction id."""
    try:
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError:
        raise ConfigError(
            "eval=ifeval needs the if-verifiable package (IFEval's instruction checkers): "
            "install lmstack's evals extra (pip install 'lmstack[evals]', or pip install "
            "if-verifiable)"
        ) from None
    return INSTRUCTION_DICT


def nltk_data_missing(instruction_id: str) -> str | None:
    """The NLTK resource this checker reads that is not installed here, if any."""
    resource = NLTK_DATA_NEEDED.get(instruction_id)
    if resource is None:
        return None
    import nltk

    try:
        nltk.data.find(resource)
    except LookupError:
        return resource
    return None


def unknown_id_message(instruction_id: str, known: list[str]) -> str:
    close = difflib.get_close_matches(instruction_id, known, n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"'{instruction_id}' is not one of if-verifiable's IFEval checkers{hint}"


def build_checker(instruction_id: str, kwargs: dict[str, Any]) -> Any:
    checker = checker_registry()[instruction_id](instruction_id)
    checker.build_description(**kwargs)
    return checker


def checker_arguments(instruction_id: str) -> list[str]:
    signature = inspect.signature(checker_registry()[instruction_id].build_description)
    return [name for name in signature.parameters if name != "self"]


def check_instruction(prompt: IFEvalPrompt, index: int) -> None:
    """One instruction of a prompt: a known checker, runnable offline, every argument given
    and accepted (a checker draws a missing argument at random: verdicts would vary)."""
    instruction_id, kwargs = prompt.instruction_ids[index], prompt.kwargs[index]
    where = f"{prompt.where} (key {prompt.key}): instruction_id_list[{index}]"
    known = list(checker_registry())
    if instruction_id not in known:
        raise DataError(f"{where}: {unknown_id_message(instruction_id, known)}")
    missing_data = nltk_data_missing(instruction_id)
    if missing_data:
        raise DataError(
            f"{where}: the {instruction_id} checker needs NLTK's '{missing_data}' data, which "
            "lmstack does not download; install it yourself (python -m nltk.downloader "
            "punkt punkt_tab) or leave this instruction out"
        )
    arguments = checker_arguments(instruction_id)
    given = {k for k, v in kwargs.items() if v is not None}
    if given != set(arguments):
        raise DataError(
            f"{where}: {instruction_id} takes the kwargs {arguments or 'none'}, got "
            f"{sorted(given) or 'none'}; give every argument (a missing one would be drawn at "
            "random)"
        )
    try:
        build_checker(instruction_id, kwargs)
    except (ValueError, TypeError, KeyError) as error:
        raise DataError(f"{where}: {instruction_id} refuses its kwargs {kwargs}: {error}") from None


# ---------------------------------------------------------------- the prompts


def parse_prompt(line: str, where: str) -> IFEvalPrompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not a JSON object ({error})") from None
    missing = [name for name in REQUIRED_FIELDS if not isinstance(row, dict) or name not in row]
    if missing:
        raise DataError(
            f"{where}: missing {', '.join(missing)}; a line of IFEval's input format is "
            '{"key", "prompt", "instruction_id_list", "kwargs"}'
        )
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise DataError(f"{where}: 'prompt' must be non-empty text")
    if not isinstance(ids, list) or not ids or not isinstance(kwargs, list):
        raise DataError(f"{where}: 'instruction_id_list' must be a non-empty list, 'kwargs' a list")
    if len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise DataError(
            f"{where}: 'kwargs' must hold one object per instruction ({len(ids)}), "
            f"got {len(kwargs)}"
        )
    return IFEvalPrompt(row["key"], row["prompt"], tuple(ids), tuple(kwargs), where)


def read_prompts(path: Path, key: str) -> list[IFEvalPrompt]:
    """Every prompt of a jsonl file, each instruction checked."""
    if not path.is_file():
        raise DataError(f"{key}: no such file: {path}")
    prompts = [
        parse_prompt(line, f"{path}:{number}")
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if line.strip()
    ]
    if not prompts:
        raise DataError(f"{path}: no prompts ({key})")
    for prompt in prompts:
        for index in range(len(prompt.instruction_ids)):
            check_instruction(prompt, index)
    return prompts


def selected_prompts(ifeval_cfg: Any) -> list[IFEvalPrompt]:
    """The prompt set (eval.ifeval.prompts, or lmstack's own), filtered and limited."""
    path = Path(ifeval_cfg.prompts) if ifeval_cfg.prompts else SHIPPED_PROMPTS
    prompts = read_prompts(path, "eval.ifeval.prompts")
    wanted = list(ifeval_cfg.instructions)
    known = list(checker_registry())
    for index, name in enumerate(wanted):
        if name not in known:
            raise ConfigError(
                f"eval.ifeval.instructions[{index}]: {unknown_id_message(name, known)}"
            )
    if wanted:
        prompts = [p for p in prompts if set(p.instruction_ids) & set(wanted)]
        if not prompts:
            raise ConfigError(
                f"eval.ifeval.instructions: no prompt of {path.name} gives any of {wanted}"
            )
    return prompts[: ifeval_cfg.limit]


def check_ifeval(eval_cfg: Any, inputs: Inputs) -> None:
    """The wheel is there, every prompt's instructions run offline with their kwargs."""
    if not eval_cfg.chat:
        raise ConfigError(
            "eval.chat: eval=ifeval asks its prompts through the model's chat template; "
            "eval.chat=false keeps only the first line of each answer (paragraphs, lists and "
            "sections would all fail): set eval.chat=true"
        )
    selected_prompts(eval_cfg.ifeval)


# ---------------------------------------------------------------- scoring


def seed_language_detection() -> None:
    """langdetect samples at random; seeded, a language verdict is the same on every run."""
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0


def followed(prompt: IFEvalPrompt, response: str) -> list[tuple[bool, bool]]:
    """(strict, loose) per instruction. As if-verifiable's own evaluation: a reasoning model's
    <think> block is dropped first, and an empty answer follows nothing."""
    from if_verifiable.common import get_loose_transformations, strip_thinking

    response = strip_thinking(response)
    if not response.strip():
        return [(False, False)] * len(prompt.instruction_ids)
    variants = get_loose_transformations(response)
    verdicts = []
    for instruction_id, kwargs in zip(prompt.instruction_ids, prompt.kwargs):
        checker = build_checker(instruction_id, kwargs)
        strict = bool(checker.check_following(response))
        loose = strict or any(v.strip() and checker.check_following(v) for v in variants)
        verdicts.append((strict, bool(loose)))
    return verdicts


def ifeval_figures(
    prompts: list[IFEvalPrompt], verdicts: list[list[list[tuple[bool, bool]]]], confidence: float
) -> dict[str, Any]:
    """IFEval's prompt- and instruction-level accuracies (strict, loose) from the verdicts of
    each prompt's samples: verdicts[prompt][sample][instruction] = (strict, loose)."""
    figures: dict[str, Any] = {}
    per_prompt = {"strict": [], "loose": []}
    for mode, position in (("strict", 0), ("loose", 1)):
        followed_count, instruction_count = 0.0, 0
        for sampled in verdicts:
            per_prompt[mode].append(mean([all(v[position] for v in s) for s in sampled]))
            followed_count += mean([sum(v[position] for v in s) for s in sampled])
            instruction_count += len(sampled[0])
        figures[f"ifeval/prompt_{mode}"] = mean(per_prompt[mode])
        figures[f"ifeval/instruction_{mode}"] = followed_count / instruction_count
    low, high = wilson_interval(sum(per_prompt["strict"]), len(prompts), confidence)
    figures |= {"ifeval/ci_low": low, "ifeval/ci_high": high}
    return figures | per_instruction(prompts, verdicts)


def per_instruction(
    prompts: list[IFEvalPrompt], verdicts: list[list[list[tuple[bool, bool]]]]
) -> dict[str, float]:
    """The strict share followed per instruction id (over its instructions and samples)."""
    shares: dict[str, list[float]] = {}
    for prompt, sampled in zip(prompts, verdicts):
        for index, instruction_id in enumerate(prompt.instruction_ids):
            shares.setdefault(instruction_id, []).append(mean([s[index][0] for s in sampled]))
    return {f"ifeval/instruction/{name}": mean(values) for name, values in sorted(shares.items())}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sample_record(prompt: IFEvalPrompt, sampled: list[str], verdicts: list[list[tuple]]):
    first = verdicts[0]
    return {
        **prompt.record(),
        "completion": sampled[0],
        "score": float(all(strict for strict, _ in first)),
        "loose_score": float(all(loose for _, loose in first)),
        "followed_strict": [strict for strict, _ in first],
        "followed_loose": [loose for _, loose in first],
        "responses": sampled,
        "scores": [float(all(strict for strict, _ in v)) for v in verdicts],
    }


def summary_line(figures: dict[str, Any], n: int, confidence: float, loose: bool) -> str:
    line = (
        f"IFEval-style instruction following (lmstack's own {n} prompts, not the official "
        f"IFEval set): prompt-level strict {figures['ifeval/prompt_strict']:.4f} "
        f"({confidence:.0%} CI [{figures['ifeval/ci_low']:.4f}, {figures['ifeval/ci_high']:.4f}])"
        f", instruction-level strict {figures['ifeval/instruction_strict']:.4f}"
    )
    if loose:
        line += (
            f"; loose {figures['ifeval/prompt_loose']:.4f} (prompt), "
            f"{figures['ifeval/instruction_loose']:.4f} (instruction)"
        )
    return line


def suite_ifeval(session: Session) -> dict[str, Any]:
    ifeval_cfg = session.eval.ifeval
    prompts = selected_prompts(ifeval_cfg)
    target = retargeted(session.target, AS_WRITTEN, ifeval_cfg.max_new_tokens)
    print(
        f"lmstack: ifeval: {len(prompts)} prompts x {session.eval.num_samples} samples", flush=True
    )
    answers = target.answers([{"question": p.prompt} for p in prompts], session.eval.num_samples)
    seed_language_detection()
    verdicts = [[followed(p, a) for a in sampled] for p, sampled in zip(prompts, answers)]
    session.samples(
        "ifeval", [sample_record(p, a, v) for p, a, v in zip(prompts, answers, verdicts)]
    )
    figures = ifeval_figures(prompts, verdicts, session.eval.confidence)
    if not ifeval_cfg.loose:
        figures = {k: v for k, v in figures.items() if not k.endswith("_loose")}
    print(
        summary_line(figures, len(prompts), session.eval.confidence, ifeval_cfg.loose), flush=True
    )
    return figures | {
        "ifeval/n": len(prompts),
        "ifeval/instructions": sum(len(p.instruction_ids) for p in prompts),
        "ifeval/prompt_set": ifeval_cfg.prompts or "lmstack",
        # equal hashes: the same prompts and instructions (scores comparable between runs)
        "ifeval/prompts_hash": stable_hash([p.record() for p in prompts], 16),
        "ifeval/max_new_tokens": ifeval_cfg.max_new_tokens,
        # equal hashes: the same answers, word for word (greedy runs reproduce)
        "ifeval/answers_hash": stable_hash(answers, 16),
    }


register(
    Suite(
        "ifeval",
        suite_ifeval,
        "ifeval/prompt_strict",
        rank=27,
        needs=("answers",),
        check=check_ifeval,
        schema=IFEvalConfig,
        options_key="ifeval",
    )
)
