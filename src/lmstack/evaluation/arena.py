"""Arena: models answer the same prompts; pairwise battles rated by a Bradley-Terry fit.

Every pair of models meets on every prompt. A battle is decided by the task's verifier
(deterministic: right beats wrong, equal outcomes tie) or by the LLM judge in both orders.
Ratings are the maximum-likelihood Bradley-Terry strengths (ties count as half a win), on
the Elo scale (400 / ln 10 points per logit, the anchor model at 1000), with 95% intervals
from bootstrap resamples of the battles (Chiang et al. 2024). Battles whose judge verdict
could not be parsed are left out of the fit and counted.

Deferred imports, for start-up time: matplotlib, numpy and openai (and the lmstack modules
that load them) are imported inside the functions that need them; the CLI's input checks
import this module first. scipy is imported where used: it comes with another dependency,
not with lmstack.
"""

from __future__ import annotations

import dataclasses
import math
from itertools import combinations
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError
from lmstack.tracking.run_dir import read_json
from lmstack.util.tables import markdown_table

ELO_SCALE = 400 / math.log(10)
ELO_BASE = 1000.0
# a weak Gaussian prior on the strengths: keeps a model that never won finite (reported)
PRIOR = 1e-3


def expand_models(specs: list[str]) -> list[tuple[str, str | None]]:
    """(name, path) per model: "base" -> None (the model group's model); a sweep directory ->
    each finished training run in it; a run directory or Hugging Face folder -> itself."""
    models: list[tuple[str, str | None]] = []
    for spec in specs:
        if spec == "base":
            models.append(("base", None))
            continue
        path = Path(spec)
        if (path / "status.json").is_file() or (path / "config.json").is_file():
            models.append((path.name, str(path)))
            continue
        runs = sorted(p.parent for p in path.glob("*/status.json") if _is_model_run(p.parent))
        if not runs:
            raise ConfigError(
                f"eval.arena.models: '{spec}' is not a run directory, a sweep directory with "
                "finished runs, a Hugging Face folder or 'base'"
            )
        models += [(run.name, str(run)) for run in runs]
    names = [name for name, _ in models]
    if len(set(names)) != len(names) or len(names) < 2:
        raise ConfigError(f"eval.arena.models: need two or more distinct models, got {names}")
    return models


def _is_model_run(run_dir: Path) -> bool:
    finished = (read_json(run_dir / "status.json") or {}).get("status") == "finished"
    has_model = any((run_dir / d).is_dir() for d in ("adapter", "model", "merged"))
    return finished and has_model


def model_config_for(model_cfg: Any, path: str | None) -> Any:
    """The model group's config pointed at one arena model."""
    if path is None:
        return dataclasses.replace(model_cfg, init_from=None)
    if (Path(path) / "status.json").is_file():
        return dataclasses.replace(model_cfg, init_from=path)
    return dataclasses.replace(model_cfg, source="hf", name_or_path=path, init_from=None)


def answer_all(
    models: list[tuple[str, str | None]], questions: list[str], config: Any, cache_dir: str
) -> dict[str, list[str]]:
    """Each model, loaded in turn in this process, answers every question (greedy, the
    `prompt` group's template, eval.max_new_tokens)."""
    from lmstack.evaluation.target import InProcessTarget, Sampling, load_local_model

    rows = [{"question": question} for question in questions]
    sampling = Sampling(config.eval.max_new_tokens, batch_size=config.eval.batch_size)
    answers: dict[str, list[str]] = {}
    for name, path in models:
        print(f"lmstack: arena model {name}", flush=True)
        local = load_local_model(
            model_config_for(config.model, path), config.quantization, cache_dir
        )
        target = InProcessTarget(local, config.prompt, config.eval.chat, sampling)
        answers[name] = [row[0] for row in target.answers(rows)]
        del local, target
    return answers


def verifier_battles(
    names: list[str], correct: dict[str, list[float]]
) -> list[tuple[str, str, float]]:
    """(model a, model b, score of a: 1 win, 0.5 tie, 0 loss) per prompt and pair."""
    battles = []
    for a, b in combinations(names, 2):
        for score_a, score_b in zip(correct[a], correct[b]):
            battles.append((a, b, 0.5 if score_a == score_b else float(score_a > score_b)))
    return battles


def judged_battles(verdicts: list[dict[str, Any]]) -> tuple[list[tuple[str, str, float]], int]:
    """Battles from judge.compare results carrying model names `a` (= x) and `b` (= y)."""
    outcome = {"x": 1.0, "y": 0.0, "tie": 0.5}
    battles = [(v["a"], v["b"], outcome[v["winner"]]) for v in verdicts if v["winner"] in outcome]
    return battles, len(verdicts) - len(battles)


def fit_bradley_terry(
    battles: list[tuple[str, str, float]], names: list[str], anchor: str
) -> dict[str, float]:
    """Elo-scaled maximum-likelihood strengths; `anchor` sits at 1000."""
    import numpy as np
    from scipy.optimize import minimize

    index = {name: i for i, name in enumerate(names)}
    a = np.array([index[x] for x, _, _ in battles])
    b = np.array([index[y] for _, y, _ in battles])
    score = np.array([s for _, _, s in battles])

    def loss(theta):
        diff = theta[a] - theta[b]
        # -[s log σ(d) + (1-s) log σ(-d)], written stably
        nll = np.sum(np.logaddexp(0, -diff) * score + np.logaddexp(0, diff) * (1 - score))
        p = 1 / (1 + np.exp(-diff))
        grad_diff = p - score
        grad = np.bincount(a, grad_diff, len(names)) - np.bincount(b, grad_diff, len(names))
        return nll + PRIOR * theta @ theta, grad + 2 * PRIOR * theta

    theta = minimize(loss, np.zeros(len(names)), jac=True, method="L-BFGS-B").x
    theta -= theta[index[anchor]]
    return {name: ELO_BASE + ELO_SCALE * float(theta[index[name]]) for name in names}


def rate(
    battles: list[tuple[str, str, float]],
    names: list[str],
    anchor: str,
    rounds: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The leaderboard: rating, 95% bootstrap interval, battle counts; best first."""
    import numpy as np

    ratings = fit_bradley_terry(battles, names, anchor)
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in names}
    for _ in range(rounds):
        drawn = [battles[i] for i in rng.integers(0, len(battles), len(battles))]
        for name, value in fit_bradley_terry(drawn, names, anchor).items():
            samples[name].append(value)
    board = []
    for name in names:
        mine = [(s if x == name else 1 - s) for x, y, s in battles if name in (x, y)]
        low, high = np.percentile(samples[name], [2.5, 97.5])
        board.append(
            {
                "model": name,
                "rating": round(ratings[name], 1),
                "ci_low": round(float(low), 1),
                "ci_high": round(float(high), 1),
                "battles": len(mine),
                "wins": sum(s == 1 for s in mine),
                "ties": sum(s == 0.5 for s in mine),
                "losses": sum(s == 0 for s in mine),
            }
        )
    board.sort(key=lambda row: -row["rating"])
    for rank, row in enumerate(board, start=1):
        row["rank"] = rank
    return board


def leaderboard_markdown(board: list[dict[str, Any]]) -> str:
    columns = ["rank", "model", "rating", "ci_low", "ci_high", "battles", "wins", "ties", "losses"]
    return markdown_table(columns, ([row[c] for c in columns] for row in board)) + "\n"


RATER_TITLES = {
    "verifier": "decided by the task's verifier",
    "judge": "decided by the LLM judge (both orders)",
    "human": "voted by people (blind, both bad = tie)",
}


def boards_markdown(boards: dict[str, list[dict[str, Any]]]) -> str:
    """One section per rater, so that people's and the machine's ratings stay apart."""
    if len(boards) == 1 and "human" not in boards:
        return leaderboard_markdown(next(iter(boards.values())))
    sections = [
        f"## {rater}: {RATER_TITLES.get(rater, rater)}\n\n{leaderboard_markdown(board)}"
        for rater, board in boards.items()
    ]
    return "\n".join(sections)


def plot_boards(boards: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Ratings with 95% intervals, one marker per rater for each model (best first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(boards.values()))
    order = [row["model"] for row in first]
    order += sorted({r["model"] for b in boards.values() for r in b} - set(order))
    position = {model: len(order) - 1 - i for i, model in enumerate(order)}  # best at the top
    figure, axis = plt.subplots(figsize=(8, 1.6 + 0.55 * len(order)))
    shift = 0.12 if len(boards) > 1 else 0.0
    for index, (rater, board) in enumerate(boards.items()):
        offset = shift * (index - (len(boards) - 1) / 2)
        axis.errorbar(
            [row["rating"] for row in board],
            [position[row["model"]] - offset for row in board],
            xerr=[
                [row["rating"] - row["ci_low"] for row in board],
                [row["ci_high"] - row["rating"] for row in board],
            ],
            fmt="o" if rater != "human" else "s",
            capsize=4,
            label=f"{rater} ({sum(row['battles'] for row in board) // 2} battles)",
        )
    axis.set_yticks(range(len(order)), list(reversed(order)))
    axis.set_xlabel("Bradley-Terry rating (Elo scale), 95% bootstrap interval")
    axis.axvline(ELO_BASE, color="0.85", zorder=0)
    axis.grid(axis="x", color="0.93")
    axis.set_title("arena ratings by " + " vs ".join(boards))
    axis.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
