"""The `label` group's schema (conf/label/): phase=label's labelling page."""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.config.rules import require


@dataclass
class LabelConfig:
    """phase=label: the blind pairwise labelling page (conf/label/)."""

    name: str = "default"
    # arena: the eval.arena models answer eval.arena.num_prompts prompts, every pair is an item;
    # or a jsonl of {prompt, answer_a, answer_b} rows (optional model_a, model_b, id)
    items: str = "arena"
    # 127.0.0.1: this machine only; any other address needs the access token
    host: str = "127.0.0.1"
    # fixed, so that open pages find a restarted server again; 0 = a free port
    port: int = 8765
    # environment variable holding the access token (required in every URL when set);
    # bound beyond this machine without one, a token is generated and kept in the run dir
    token_env: str = ""
    title: str = ""

    def __post_init__(self) -> None:
        require(0 <= self.port < 65536, "label.port", f"{self.port} is not a port number")
        require(bool(self.items), "label.items", "'arena' or a jsonl of answer pairs")
