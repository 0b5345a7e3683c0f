"""phase=label: a blind pairwise labelling page until Ctrl-C; a restart continues the session.

Reads top to bottom: the items (kept in the run directory once made: the arena's models answer
its prompts and every pair is an item, or a jsonl of answer pairs) → the vote store
(votes.sqlite beside them) → the access token → serve the page → on Ctrl-C or SIGTERM, close
the store and write the session's counts. The same command finds the same run directory, so a
restarted page shows each labeller the items they have not voted on yet.

    python run.py phase=label 'eval.arena.models=[base,outputs/sweeps/sweep-<hash>]'
"""

from __future__ import annotations

import os
import secrets
import signal
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError
from lmstack.evaluation import arena, votes
from lmstack.evaluation.label_server import LOOPBACK, LabelApp, make_server, page_url
from lmstack.phases.context import RunContext
from lmstack.phases.eval import arena_problems
from lmstack.tracking.run_dir import set_status, write_json
from lmstack.util.signals import resent_from_finalizer

TOKEN_FILE_NAME = "label_token"


def run(ctx: RunContext) -> dict[str, Any]:
    label_cfg, run_dir = ctx.config.label, ctx.run_dir
    items = session_items(ctx)
    store = votes.VoteStore(run_dir / votes.VOTES_DB_NAME)
    token = access_token(label_cfg, run_dir, exposed=label_cfg.host not in LOOPBACK)
    try:
        server = make_server(LabelApp(items, store, token, label_cfg.title), *address(label_cfg))
    except OSError as error:
        store.close()
        raise ConfigError(
            f"label.port: cannot listen on {label_cfg.host}:{label_cfg.port} ({error}); "
            "pick another port (label.port=0 for a free one)"
        ) from None
    port = server.server_address[1]
    write_json(run_dir / "label_server.json", {"host": label_cfg.host, "port": port})
    print(
        f"lmstack: labelling page for {len(items)} items (votes: {store.path})\n"
        f"  open:  {page_url(label_cfg.host, port, token)}\n"
        f"  each labeller: {page_url(label_cfg.host, port, token, 'NAME')}\n"
        "  stop:  Ctrl-C (a restart with the same command continues)",
        flush=True,
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("lmstack: stopping the labelling page", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
        counts = store.counts()
        store.close()
    metrics = {"label/items": len(items), "label/votes": sum(counts.values())}
    metrics |= {f"label/votes/{name}": count for name, count in counts.items()}
    write_json(run_dir / "label_summary.json", metrics)
    set_status(run_dir, "stopped")
    return metrics


def _interrupt(signum: int, frame: Any) -> None:
    if not resent_from_finalizer(signum, frame):
        raise KeyboardInterrupt


def address(label_cfg: Any) -> tuple[str, int]:
    return label_cfg.host, label_cfg.port


def session_items(ctx: RunContext) -> list[votes.Item]:
    """The run directory's items when it has them (a restart), else made and kept there."""
    path = ctx.run_dir / votes.ITEMS_FILE_NAME
    if path.is_file():
        return votes.read_items(path)
    spec = ctx.config.label.items
    items = arena_items(ctx) if spec == "arena" else votes.load_pairs_jsonl(spec)
    votes.save_items(items, path)
    return items


def arena_items(ctx: RunContext) -> list[votes.Item]:
    """The eval.arena models answer the arena's prompts; every pair on every prompt."""

    arena_cfg = ctx.config.eval.arena
    if len(arena_cfg.models) < 2:
        raise ConfigError(
            "eval.arena.models: label.items=arena needs two or more models to pair "
            "(run dirs, sweep dirs, HF folders, base), or label.items=<pairs.jsonl>"
        )
    models = arena.expand_models(list(arena_cfg.models))
    questions = [p.question for p in arena_problems(arena_cfg)]
    answers = arena.answer_all(models, questions, ctx.config, ctx.cache_dir)
    return votes.arena_items(questions, answers, [name for name, _ in models])


def access_token(label_cfg: Any, run_dir: Path, exposed: bool) -> str:
    """label.token_env's value; bound beyond this machine without one, a generated token
    kept in the run directory (so a restarted page takes the same URL)."""
    if label_cfg.token_env:
        token = os.environ.get(label_cfg.token_env, "")
        if not token:
            raise ConfigError(
                f"label.token_env: the environment variable {label_cfg.token_env} is not set"
            )
        return token
    if not exposed:
        return ""
    path = run_dir / TOKEN_FILE_NAME
    if not path.is_file():
        path.write_text(secrets.token_urlsafe(18))
        path.chmod(0o600)
    return path.read_text().strip()
