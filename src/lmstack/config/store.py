"""Registers the schemas in Hydra's ConfigStore (the run directory's `${run_id:}` and
`${sweep_id:}` resolvers are the run identity's: tracking/identity.register_resolvers)."""

from __future__ import annotations

import warnings

from hydra._internal.config_repository import ConfigRepository
from hydra.core.config_store import ConfigStore
from hydra.core.object_type import ObjectType

from lmstack.config.groups.serving import serving_schemas
from lmstack.config.keys import name_unknown_override_keys
from lmstack.config.objectives import objective_schemas
from lmstack.config.plugins import load_plugins
from lmstack.config.schema import GROUP_SCHEMAS, Config

_registered = False


def register_configs() -> None:
    """Idempotent: `run.py` and the tests both call it."""
    global _registered
    if _registered:
        return
    store = ConfigStore.instance()
    store.store(name="lmstack_schema", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name="schema", node=schema)
    load_plugins()
    for name, schema in objective_schemas().items():
        store.store(group="objective", name=f"{name}_schema", node=schema)
    for name, schema in serving_schemas().items():
        store.store(group="serving", name=f"{name}_schema", node=schema)
    _hide_internal_options()
    name_unknown_override_keys()
    # conf/hydra/launcher/joblib.yaml shares the joblib plugin's name on purpose (it is what
    # hydra/launcher=joblib picks); Hydra then validates it against the plugin's schema, and warns
    warnings.filterwarnings(
        "ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema"
    )
    _registered = True


def is_internal_option(name: str) -> bool:
    """The schema nodes above: building blocks of a group's YAML files, not choices."""
    return name == "schema" or name.endswith("_schema")


def _hide_internal_options() -> None:
    """Hydra lists a group's options from every config source, the ConfigStore's schema
    nodes included: in "Available options" after a typo and in glob sweeps. Filter them
    where Hydra lists (its ConfigRepository; no public hook exists), once."""

    listing = ConfigRepository.get_group_options
    if getattr(listing, "hides_internal", False):
        return

    def get_group_options(self, group_name, results_filter=ObjectType.CONFIG):
        options = listing(self, group_name, results_filter)
        return [name for name in options if not is_internal_option(name)]

    get_group_options.hides_internal = True
    ConfigRepository.get_group_options = get_group_options
