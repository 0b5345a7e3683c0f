"""Unknown keys fail at composition, `+` overrides included.

Hydra refuses `model.nosuchfield=1` against a group's schema, but `+model.nosuchfield=1` (and
`+nosuchgroup=1`) adds the key anyway, and OmegaConf then drops it without a word: the run
would train as if it had not been given. This walk finds every such key, naming the schema
that lacks it and the nearest field it has. Hydra's own refusal of the first form advises
the `+` that lmstack then refuses; `name_unknown_override_keys` words it as lmstack does.
"""

from __future__ import annotations

import dataclasses
import difflib

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from lmstack.config.groups.objective import ObjectiveConfig
from lmstack.config.objectives import objective_schemas
from lmstack.config.schema import GROUP_SCHEMAS
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


def name_unknown_override_keys() -> None:
    """`trainer.max_stepz=5` answers "trainer.max_stepz: unknown key, not in TrainerConfig (did
    you mean 'max_steps'?)" where Hydra says "To append to your config use +trainer.max_stepz=5".
    Hydra has no hook for the wording: wrap where it applies overrides (as config/store.py
    wraps its option listing), once."""
    apply_overrides = ConfigLoaderImpl._apply_overrides_to_config
    if getattr(apply_overrides, "names_unknown_keys", False):
        return

    def _apply_overrides_to_config(overrides, cfg):
        try:
            apply_overrides(overrides, cfg)
        except ConfigCompositionException as error:
            schema = _schema_without(error.__cause__)
            if schema is None:
                raise
            key = error.__cause__.full_key
            raise ConfigCompositionException(f"lmstack: error: {_describe(key, schema)}") from None

    _apply_overrides_to_config.names_unknown_keys = True
    ConfigLoaderImpl._apply_overrides_to_config = staticmethod(_apply_overrides_to_config)


def _schema_without(cause: BaseException | None) -> type | None:
    """The schema an override's key is missing from, when that is why Hydra refused it."""
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not cause.full_key:
        return None
    schema = cause.object_type
    return schema if isinstance(schema, type) and dataclasses.is_dataclass(schema) else None


def _describe(key: str, schema: type) -> str:
    name = key.rsplit(".", 1)[-1]
    if issubclass(schema, ObjectiveConfig) and (owners := _objectives_with(name)):
        # `objective.beta=0.1` on the default objective (sft): the key is another objective's
        choose = f"objective={owners[0]} objective.{name}=..."
        return (
            f"{key}: unknown key, not in {schema.__name__}: '{name}' is a key of objective "
            f"{', '.join(owners)}; choose one first ({choose})"
        )
    close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(schema)], n=1)
    if not close and "." not in key:
        close = _group_keys_like(name)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    where = "the config" if "." not in key else schema.__name__
    return f"{key}: unknown key, not in {where}{hint}"


def _objectives_with(name: str) -> list[str]:
    """The registered objectives whose schema has the key `name`, in registration order."""
    return [
        objective
        for objective, schema in objective_schemas().items()
        if name in {f.name for f in dataclasses.fields(schema)}
    ]


def _group_keys_like(name: str) -> list[str]:
    """A group's key given at the top: `max_steps=5` is meant as `trainer.max_steps=5`."""
    dotted: dict[str, list[str]] = {}
    for group, schema in {**GROUP_SCHEMAS, "objective": ObjectiveConfig}.items():
        for field in dataclasses.fields(schema):
            dotted.setdefault(field.name, []).append(f"{group}.{field.name}")
    close = difflib.get_close_matches(name, list(dotted), n=1)
    return dotted[close[0]][:3] if close else []
