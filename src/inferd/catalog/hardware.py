"""What machine inferd is running on: the facts profile selection needs.

Reads the live machine (Linux /proc and cgroup files) into a `Hardware` value. Usable cores honour
the process's CPU affinity and a cgroup CPU quota; memory honours a cgroup memory limit when it is
lower than the machine's, because that is what a container may actually use. `profiles` matches
profile requirements against this value; nothing here knows about models or engines.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

# ISA features that CPU profiles may require; others in /proc/cpuinfo are ignored.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "f16c")


@dataclass(frozen=True)
class CPU:
    arch: str
    model_name: str
    usable_cores: int
    features: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Hardware:
    cpu: CPU
    memory_bytes: int

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30

    def summary(self) -> str:
        feats = ",".join(sorted(self.cpu.features)) or "none"
        return (
            f"{self.cpu.arch} {self.cpu.model_name}, {self.cpu.usable_cores} usable cores "
            f"({feats}), {self.memory_gib:.1f} GiB memory"
        )


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup v2 (`cpu.max`) or v1 (`cfs_quota_us`) quota, if one is set."""
    text = _read(root / "cpu.max")
    if text:
        quota, _, period = text.strip().partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota_text = _read(root / "cpu" / "cpu.cfs_quota_us")
    period_text = _read(root / "cpu" / "cpu.cfs_period_us")
    if quota_text and period_text and int(quota_text) > 0:
        return int(quota_text) / int(period_text)
    return None


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes allowed by a cgroup v2 (`memory.max`) or v1 limit, if one is set."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        text = _read(path)
        if text is None:
            continue
        text = text.strip()
        # v1 reports "no limit" as a huge number near 2**63.
        if text != "max" and int(text) < 2**60:
            return int(text)
        return None
    return None


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """Model name and the features of CPU_FEATURES present, from /proc/cpuinfo text."""
    model_name, flags = "unknown CPU", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model_name == "unknown CPU":
            model_name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split()) & frozenset(CPU_FEATURES)
    return model_name, flags


def parse_meminfo_total(text: str) -> int:
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError("MemTotal missing from meminfo")


def detect() -> Hardware:
    """Read the live machine."""
    model_name, features = parse_cpuinfo(_read(Path("/proc/cpuinfo")) or "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_cpu_limit()
    usable = max(1, min(cores or 1, math.floor(quota) if quota else cores or 1))
    meminfo = _read(Path("/proc/meminfo"))
    memory = parse_meminfo_total(meminfo) if meminfo else 0
    limit = cgroup_memory_limit()
    if limit is not None:
        memory = min(memory, limit) if memory else limit
    cpu = CPU(
        arch=platform.machine(), model_name=model_name, usable_cores=usable, features=features
    )
    return Hardware(cpu=cpu, memory_bytes=memory)
