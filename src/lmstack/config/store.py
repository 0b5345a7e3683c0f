"""Registers the schemas in Hydra's ConfigStore and lmstack's OmegaConf resolvers."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lmstack.config.schema import GROUP_SCHEMAS, OBJECTIVE_SCHEMAS, Config

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
    for name, schema in OBJECTIVE_SCHEMAS.items():
        store.store(group="objective", name=f"{name}_schema", node=schema)
    _register_resolvers()
    _registered = True


def _register_resolvers() -> None:
    from lmstack.tracking.identity import run_id_resolver, sweep_id_resolver

    OmegaConf.register_new_resolver("run_id", run_id_resolver, replace=True)
    OmegaConf.register_new_resolver("sweep_id", sweep_id_resolver, replace=True)
