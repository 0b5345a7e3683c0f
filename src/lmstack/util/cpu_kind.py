"""This machine's CPU kind: the key engine builds are filed under (`make engines` runs this file
as a script), so a build carried to another kind of CPU is rebuilt instead of trusted.

Vendor, architecture and the widest vector instructions the CPU offers, the ones compiled or
chosen kernels depend on: e.g. intel-x86_64-avx512-bf16-amx or amd-x86_64-avx2. No imports from
lmstack: the Makefile runs it with the system's Python before anything is installed.
"""

from __future__ import annotations

import platform
from pathlib import Path

VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


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
    flags = set((cpuinfo_field("flags", cpuinfo) or cpuinfo_field("Features", cpuinfo)).split())
    vendor_id = cpuinfo_field("vendor_id", cpuinfo)
    kind = [VENDORS.get(vendor_id, vendor_id.lower() or "unknown"), platform.machine()]
    if "avx512f" in flags:
        kind.append("avx512")
    elif "avx2" in flags:
        kind.append("avx2")
    kind += [name for flag, name in (("avx512_bf16", "bf16"), ("amx_tile", "amx")) if flag in flags]
    return "-".join(kind)


if __name__ == "__main__":
    print(cpu_kind())
