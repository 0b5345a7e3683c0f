"""PEFT adapter folders from anywhere (TRL, peft, another machine): found, checked against
their base, and merged once into a Hugging Face folder every loader takes.

An adapter folder is `adapter_config.json` plus its weights. Its base is `model.base` when
given, else what the folder says: lmstack's own `lmstack.json` (where the base was when it
was trained, and its portable name), else `base_model_name_or_path` (a folder here, a name of
lmstack's built-in cache, or a hub id). The merged model is cached under
`<cache>/adapters/<hash of adapter and base>/`, with the adapter's tokenizer when it has one
(its chat template) and the base's otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError
from lmstack.models.builtin import file_lock
from lmstack.models.export import ADAPTER_CONFIG, LMSTACK_ADAPTER_INFO, merge_adapter
from lmstack.tracking.identity import file_fingerprint, stable_hash

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter_folder(path: str | Path | None) -> bool:
    return bool(path) and (Path(str(path)).expanduser() / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: Path, key: str) -> dict[str, Any]:
    config_file = folder / ADAPTER_CONFIG
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: {config_file} is not readable JSON ({error})") from None
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ConfigError(
            f"{key}: {folder} has {ADAPTER_CONFIG} but no adapter weights "
            f"({' or '.join(ADAPTER_WEIGHTS)})"
        )
    return config


def adapter_base(folder: Path, base: str | None, cache_dir: str, key: str) -> str:
    """The base model folder (or hub id) the adapter in `folder` goes on."""
    if base:
        return _base_folder_or_hub_id(base, f"model.base: '{base}'", key, folder)
    config = read_adapter_config(folder, key)
    info = _read_info(folder)
    for candidate in (info.get("base_path"), config.get("base_model_name_or_path")):
        if candidate and (Path(candidate).expanduser() / "config.json").is_file():
            return str(Path(candidate).expanduser())
    name = info.get("base_name") or config.get("base_model_name_or_path") or ""
    if name and (Path(cache_dir) / name / "config.json").is_file():
        return str(Path(cache_dir) / name)  # a built-in base, by its cache name
    if _looks_like_hub_id(name):
        return name
    raise ConfigError(
        f"{key}: the base of the adapter is not here: {folder / ADAPTER_CONFIG} names "
        f"base_model_name_or_path '{name}', which is no model folder on this machine; "
        "pass the base model with model.base=<folder or hub id>"
    )


def _base_folder_or_hub_id(base: str, what: str, key: str, folder: Path) -> str:
    path = Path(base).expanduser()
    if (path / "config.json").is_file():
        return str(path)
    if _looks_like_hub_id(base) and not path.exists():
        return base
    raise ConfigError(
        f"{what} is not a Hugging Face model folder (no config.json) for the adapter in {folder}"
    )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _read_info(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / LMSTACK_ADAPTER_INFO).read_text())
    except (OSError, ValueError):
        return {}


def merged_adapter(folder: str | Path, base: str | None, cache_dir: str, key: str) -> Path:
    """The adapter folded into its base, as a Hugging Face folder (merged once, cached)."""

    folder = Path(str(folder)).expanduser().resolve()
    base_path = adapter_base(folder, base, cache_dir, key)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    key_hash = stable_hash([base_path, *[(p.name, file_fingerprint(str(p))) for p in files]], 16)
    target = Path(cache_dir).expanduser().resolve() / "adapters" / key_hash / "merged"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / "merge.lock"):
        if not (target / "config.json").is_file():
            print(f"lmstack: merging the adapter in {folder} into {base_path}", flush=True)
            merge_checked(base_path, folder, target, key)
    return target


def merge_checked(base_path: str, folder: Path, target: Path, key: str) -> None:
    """Merge, turning a base that does not fit the adapter into a message saying so."""
    try:
        merge_adapter(base_path, folder, target)
    except (ValueError, RuntimeError, KeyError, OSError) as error:
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise ConfigError(
            f"{key}: the adapter in {folder} does not fit the base '{base_path}' "
            f"({type(error).__name__}: {first_line}); pass the base it was trained on with "
            "model.base=<folder or hub id>"
        ) from None
