"""The `paths` group's schema (conf/paths/): where runs, caches and engines go."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PathsConfig:
    output_dir: str = "outputs"
    cache_dir: str = ".cache/lmstack"
    # DPO reference log-probs (objective.precompute_ref=true)
    ref_logps_dir: str = ".cache/lmstack/ref_logps"
    # engines' own environments and builds (`make engines`): vllm/, llamacpp/
    engines_dir: str = ".cache/engines"
