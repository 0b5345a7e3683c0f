"""Registers the schemas in Hydra's ConfigStore and lmstack's OmegaConf resolvers."""

from __future__ import annotations

import importlib
import os
import warnings

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lmstack.config.objectives import objective_schemas
from lmstack.config.schema import GROUP_SCHEMAS, SERVING_SCHEMAS, Config

_registered = False
PLUGINS_ENV = "LMSTACK_PLUGINS"


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
    for name, schema in SERVING_SCHEMAS.items():
        store.store(group="serving", name=f"{name}_schema", node=schema)
    _register_resolvers()
    # conf/hydra/launcher/joblib.yaml shares the joblib plugin's name on purpose (it is what
    # hydra/launcher=joblib picks); Hydra then validates it against the plugin's schema, and warns
    warnings.filterwarnings(
        "ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema"
    )
    _registered = True


def load_plugins() -> None:
    """Modules named in LMSTACK_PLUGINS (comma-separated), imported before composition: an
    objective from outside lmstack registers its schema and data formats there."""
    for name in filter(None, os.environ.get(PLUGINS_ENV, "").split(",")):
        importlib.import_module(name.strip())


def _register_resolvers() -> None:
    from lmstack.tracking.identity import run_id_resolver, sweep_id_resolver

    OmegaConf.register_new_resolver("run_id", run_id_resolver, replace=True)
    # cached: Hydra copies the launching process's resolver cache into every point's config,
    # so a point run in another process (joblib, Slurm) lands in the same sweep dir
    OmegaConf.register_new_resolver("sweep_id", sweep_id_resolver, replace=True, use_cache=True)
