"""The `harvest` group's schema (conf/harvest/): phase=harvest, served traffic and its feedback
turned into training rows (lmstack.serving.harvest)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmstack.config.groups.objective import RewardFunctionConfig
from lmstack.config.rules import require, require_choice

HARVEST_KINDS = ("kto", "preference", "sft")
SPLIT_UNITS = ("user", "prompt")
# the scorers that compare an answer with the prompt's reference (harvest.references)
NEEDS_REFERENCE = ("verifier", "math", "exact", "normalized", "numeric", "json_fields", "scorer")


@dataclass
class HarvestConfig:
    """phase=harvest: rows for the objectives from one or more serve or A/B runs' traces."""

    name: str = "default"
    # trace stores (traces.sqlite), or serve, A/B or sweep directories holding them, and
    # labelling sessions (phase=label run directories: their majority votes become preference
    # pairs) (required)
    sources: list[str] = field(default_factory=list)
    # kto: each rated answer with its label (TRL's unpaired preference rows); preference: per
    # prompt, the best- against the worst-rated different answer (prompt, chosen, rejected);
    # sft: answers rated at or above min_score (conversational messages)
    kinds: list[str] = field(default_factory=lambda: ["kto"])
    # a rating at or above this is good: a KTO label of true, an SFT row (thumbs up = 1)
    min_score: float = 1.0
    # rate every answered request by these weighted rewards instead of users' feedback (entries
    # as objective.rewards': reward_model with a path, judge, format, or a reference scorer:
    # exact, normalized, numeric, json_fields, scorer), so repeated samples of a prompt make
    # preference pairs by score
    scorers: list[RewardFunctionConfig] = field(default_factory=list)
    # the reference scorers' answers: a jsonl of {"prompt": ...} or {"messages": [...]} with
    # "answer" (a bench prompt file with answers serves); a prompt without one scores 0
    references: str | None = None
    # filters: requests received in [since, until) (unix seconds; null = open), and only these
    # variants, prompt versions, engines and users (empty = all)
    since: float | None = None
    until: float | None = None
    variants: list[str] = field(default_factory=list)
    prompt_versions: list[str] = field(default_factory=list)
    engines: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    # one row per prompt (sft, preference) or per prompt and answer (kto): the latest rating
    dedup: bool = True
    # the held-out share, drawn by user (requests without a user id: by prompt) or by prompt;
    # a train request whose prompt is held out is dropped, so no prompt is on both sides
    heldout_fraction: float = 0.1
    split_by: str = "user"
    seed: int = 0
    # emails, phone numbers and API keys replaced by [email], [phone], [api_key] in prompts and
    # answers; pii_rules adds named regexes (or replaces a built-in one by its name)
    pii: bool = True
    pii_rules: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for index, scorer in enumerate(self.scorers):
            scorer.check(f"harvest.scorers[{index}]")
            require(
                scorer.name not in NEEDS_REFERENCE or bool(self.references),
                "harvest.references",
                f"harvest.scorers[{index}] ({scorer.name}) compares answers with references: "
                "give a jsonl of prompts with their answers",
            )
        for index, kind in enumerate(self.kinds):
            require_choice(kind, HARVEST_KINDS, f"harvest.kinds[{index}]")
        require(bool(self.kinds), "harvest.kinds", f"name one or more of {HARVEST_KINDS}")
        require_choice(self.split_by, SPLIT_UNITS, "harvest.split_by")
        require(
            0 <= self.heldout_fraction < 1,
            "harvest.heldout_fraction",
            f"{self.heldout_fraction} is not in [0, 1)",
        )
        if self.since is not None and self.until is not None:
            require(self.since < self.until, "harvest.until", "must be after harvest.since")
        for name, pattern in self.pii_rules.items():
            try:
                re.compile(pattern)
            except re.error as error:
                require(False, f"harvest.pii_rules.{name}", f"not a regular expression: {error}")
