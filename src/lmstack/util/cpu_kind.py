"""This machine's CPU kind: the key engine builds are filed under (`make engines` runs this file
as a script), so a build carried to another kind of CPU is rebuilt instead of trusted.

Vendor, architecture and the widest vector instructions the CPU offers, the ones compiled or
chosen kernels depend on: e.g. intel-x86_64-avx512-bf16-amx or amd-x86_64-avx2. No imports from
lmstack: the Makefile runs it with the system's Python before anything is installed.

`--llamacpp-level` prints the llama.cpp CPU level that `make engines` compiles for this CPU:
the most capable of llama.cpp's x86 levels whose instructions this CPU has.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}

# llama.cpp's x86 CPU levels (ggml/src/CMakeLists.txt, GGML_CPU_ALL_VARIANTS) with the features
# each is compiled for, and the /proc/cpuinfo flags each feature needs (ggml's AVX512 is
# -mavx512f/cd/vl/dq/bw). One level is compiled, not all fourteen: the build is filed under its
# level, so another CPU gets a build of its own, and the others cost ~8 min on 2 cores.
LLAMACPP_X86_LEVELS = {
    "x64": (),
    "sse42": ("SSE42",),
    "sandybridge": ("SSE42", "AVX"),
    "ivybridge": ("SSE42", "AVX", "F16C"),
    "piledriver": ("SSE42", "AVX", "F16C", "FMA"),
    "haswell": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"),
    "skylakex": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
    "cannonlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI"),
    "cascadelake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI"),
    "icelake": (
        *("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
        *("AVX512_VBMI", "AVX512_VNNI"),
    ),
    "cooperlake": (
        *("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
        *("AVX512_VNNI", "AVX512_BF16"),
    ),
    "zen4": (
        *("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
        *("AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"),
    ),
    "alderlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX_VNNI"),
}
LLAMACPP_FEATURE_FLAGS = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "AVX2": ("avx2",),
    "BMI2": ("bmi2",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AVX_VNNI": ("avx_vnni",),
}


def cpuinfo_field(name: str, cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def cpu_kind(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    flags = _cpu_flags(cpuinfo)
    vendor_id = cpuinfo_field("vendor_id", cpuinfo)
    kind = [VENDORS.get(vendor_id, vendor_id.lower() or "unknown"), platform.machine()]
    if "avx512f" in flags:
        kind.append("avx512")
    elif "avx2" in flags:
        kind.append("avx2")
    kind += [name for flag, name in (("avx512_bf16", "bf16"), ("amx_tile", "amx")) if flag in flags]
    return "-".join(kind)


def _cpu_flags(cpuinfo: str | None) -> set[str]:
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    return set((cpuinfo_field("flags", cpuinfo) or cpuinfo_field("Features", cpuinfo)).split())


def llamacpp_level(cpuinfo: str | None = None) -> str:
    """The llama.cpp x86 level to compile here: of those whose instructions this CPU has, the
    one with the most features (zen4 on an AVX-512 BF16 Xeon, haswell on an AVX2 EPYC); "all"
    off x86, where every level of llama.cpp's own list is compiled."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "all"
    flags = _cpu_flags(cpuinfo)
    usable = [
        level
        for level, features in LLAMACPP_X86_LEVELS.items()
        if all(flag in flags for feature in features for flag in LLAMACPP_FEATURE_FLAGS[feature])
    ]
    return max(usable, key=lambda level: len(LLAMACPP_X86_LEVELS[level]))


if __name__ == "__main__":
    print(llamacpp_level() if sys.argv[1:] == ["--llamacpp-level"] else cpu_kind())
