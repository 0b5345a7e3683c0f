"""Unknown keys fail at composition, `+` overrides included.

Hydra refuses `model.nosuchfield=1` against a group's schema, but `+model.nosuchfield=1` (and
`+nosuchgroup=1`) adds the key anyway, and OmegaConf then drops it without a word: the run
would train as if it had not been given. This walk finds every such key, naming the schema
that lacks it and the nearest field it has.
"""

from __future__ import annotations

import dataclasses
import difflib

from omegaconf import DictConfig, ListConfig, OmegaConf

from lmstack.errors import ConfigError

# the root's keys that are Hydra's, not lmstack's
HYDRA_KEYS = ("hydra",)


def unknown_keys(node: DictConfig, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted key, the schema it is not in) for every key no schema declares."""
    schema = OmegaConf.get_type(node)
    declared = (
        {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    )
    found = []
    for key in node:
        path = f"{prefix}{key}"
        if not prefix and key in HYDRA_KEYS:
            continue
        if declared is not None and key not in declared:
            found.append((path, schema))
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            found += unknown_keys(child, f"{path}.")
        elif isinstance(child, ListConfig) and not child._is_missing() and not child._is_none():
            for index, item in enumerate(child):
                if isinstance(item, DictConfig):
                    found += unknown_keys(item, f"{path}[{index}].")
    return found


def check_known_keys(cfg: DictConfig) -> None:
    """A ConfigError naming every key that no schema declares."""
    problems = [_describe(key, schema) for key, schema in unknown_keys(cfg)]
    if problems:
        raise ConfigError("; ".join(problems))


def _describe(key: str, schema: type) -> str:
    name = key.rsplit(".", 1)[-1]
    fields = [f.name for f in dataclasses.fields(schema)]
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    where = "the config" if "." not in key else schema.__name__
    return f"{key}: unknown key, not in {where}{hint}"
