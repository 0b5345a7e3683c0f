"""Plug-ins from outside lmstack, loaded one way: objectives, serving engines, eval suites and
trackers.

A plug-in is a module that registers records when imported: `register_objective(ObjectiveSpec(
...))`, `register_engine(EngineRecord(...))`, `register(Suite(...))`, `register_tracker(
Tracker(...))`. lmstack imports it before composing a config, from either
- an installed package's entry point in the `lmstack.plugins` group (its pyproject.toml:
  `[project.entry-points."lmstack.plugins"] toy = "toy_package.plugin"`), or
- LMSTACK_PLUGINS=module,module (for scripts and modules that are not installed).
The module's YAML options sit in a `conf/` folder beside it, laid out as lmstack's own conf/
(`conf/objective/toy.yaml`, `conf/serving/toy.yaml`, `conf/eval/toy.yaml`,
`conf/logger/toy.yaml`), which joins Hydra's search path (src/hydra_plugins/lmstack_plugins):
one module plus one YAML, nothing to edit in lmstack.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from importlib import metadata
from pathlib import Path

from lmstack.errors import ConfigError

ENTRY_POINT_GROUP = "lmstack.plugins"
PLUGINS_ENV = "LMSTACK_PLUGINS"

_loaded: set[str] = set()


def plugin_modules() -> list[tuple[str, str]]:
    """(module, where it was named) for every plug-in: entry points first, then the variable."""
    found = [
        (entry.value.split(":")[0], _entry_point_origin(entry))
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)
    ]
    named = filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",")))
    return found + [(module, PLUGINS_ENV) for module in named]


def load_plugins() -> None:
    """Imports every plug-in module once; importing registers its records. Idempotent: the
    command line, the eval phase and a Slurm job each call it."""
    for module, origin in plugin_modules():
        if module in _loaded:
            continue
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(
                f"{origin}: cannot import plug-in module '{module}' ({error})"
            ) from None
        _loaded.add(module)


def plugin_conf_dirs() -> list[Path]:
    """The `conf/` folders beside the plug-in modules, found without importing them."""
    folders = []
    for module, _ in plugin_modules():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue  # load_plugins names the module that cannot be imported
        if spec is None or spec.origin is None:
            continue
        conf = Path(spec.origin).parent / "conf"
        if conf.is_dir() and conf not in folders:
            folders.append(conf)
    return folders


def _entry_point_origin(entry: metadata.EntryPoint) -> str:
    package = entry.dist.name if entry.dist is not None else "an installed package"
    return f"entry point '{entry.name}' ({ENTRY_POINT_GROUP}, from {package})"
