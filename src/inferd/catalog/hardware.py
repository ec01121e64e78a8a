"""What machine inferd is running on: the facts profile selection needs.

`detect()` reads the live machine: NVIDIA GPUs through NVML (`nvidia-ml-py`), falling back to
`nvidia-smi --query-gpu ... --format=csv`; the CPU from /proc and the scheduler (usable cores honour
CPU affinity and a cgroup CPU quota; memory honours a cgroup limit when it is lower than the
machine's, because that is what a container may actually use). `from_captures(folder)` reads the
same facts from files captured on another machine (`--hardware PATH`), so GPU selection can be
tested on a CPU-only machine against real captures. `profiles` matches requirements against the
resulting `Hardware`; nothing here knows about models or engines.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET  # parses nvidia-smi's own output
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferd.errors import ConfigError

# ISA features that CPU profiles may require; others in the flags are ignored.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "fma", "f16c")
# NVIDIA architecture by compute capability major (minor where it matters).
_FAMILIES = {7: "volta", 8: "ampere", 9: "hopper", 10: "blackwell", 12: "blackwell"}
MIB = 2**20


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    uuid: str = ""

    @property
    def family(self) -> str:
        major, minor = self.compute_capability
        if (major, minor) == (7, 5):
            return "turing"
        if (major, minor) == (8, 9):
            return "ada"
        return _FAMILIES.get(major, "unknown")

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30


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
    gpus: tuple[GPU, ...] = ()
    driver: str | None = None
    source: str = "live machine"

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30

    def summary(self) -> str:
        feats = ",".join(sorted(self.cpu.features)) or "none"
        text = (
            f"{self.cpu.arch} {self.cpu.model_name}, {self.cpu.usable_cores} usable cores "
            f"({feats}), {self.memory_gib:.1f} GiB memory"
        )
        if self.gpus:
            names = {g.name for g in self.gpus}
            each = ", ".join(f"{sum(g.name == n for g in self.gpus)} x {n}" for n in sorted(names))
            cc = ".".join(map(str, self.gpus[0].compute_capability))
            text += f"; GPUs: {each} ({self.gpus[0].memory_gib:.0f} GiB, cc {cc})"
        else:
            text += "; no NVIDIA GPU"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "cpu": {
                "arch": self.cpu.arch,
                "model": self.cpu.model_name,
                "usable_cores": self.cpu.usable_cores,
                "features": sorted(self.cpu.features),
            },
            "memory_bytes": self.memory_bytes,
            "driver": self.driver,
            "gpus": [
                {
                    "index": g.index,
                    "name": g.name,
                    "memory_bytes": g.memory_bytes,
                    "compute_capability": ".".join(map(str, g.compute_capability)),
                    "family": g.family,
                }
                for g in self.gpus
            ],
        }


# ---------------------------------------------------------------- CPU and memory, live


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
    """Model name and the features of CPU_FEATURES present, from /proc/cpuinfo-style text."""
    model_name, flags = "unknown CPU", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model_name == "unknown CPU":
            model_name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split()) & frozenset(CPU_FEATURES)
    return model_name, flags


def parse_meminfo_total(text: str) -> int:
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError("MemTotal missing from meminfo")


def parse_free_b(text: str) -> int:
    """Total memory in bytes from `free -b` output."""
    for line in text.splitlines():
        if line.startswith("Mem:"):
            return int(line.split()[1])
    raise ValueError("no 'Mem:' line in free -b output")


def _live_cpu() -> tuple[CPU, int]:
    model_name, features = parse_cpuinfo(_read(Path("/proc/cpuinfo")) or "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_cpu_limit()
    usable = max(1, min(cores or 1, math.floor(quota) if quota else cores or 1))
    meminfo = _read(Path("/proc/meminfo"))
    memory = parse_meminfo_total(meminfo) if meminfo else 0
    limit = cgroup_memory_limit()
    if limit is not None:
        memory = min(memory, limit) if memory else limit
    return CPU(platform.machine(), model_name, usable, features), memory


# ---------------------------------------------------------------- GPUs, live


def _nvml_gpus() -> tuple[list[GPU], str | None] | None:
    """GPUs through NVML, or None when NVML is not there (no package, no driver)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(
                GPU(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    compute_capability=tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
                    uuid=str(pynvml.nvmlDeviceGetUUID(handle)),
                )
            )
        return gpus, str(driver.decode() if isinstance(driver, bytes) else driver)
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


NVIDIA_SMI_QUERY = "index,name,uuid,memory.total,compute_cap,driver_version"


def _nvidia_smi_gpus() -> tuple[list[GPU], str | None] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_query_csv(out)


# ---------------------------------------------------------------- capture parsers


def _number(text: str) -> float:
    found = re.search(r"[\d.]+", text)
    if not found:
        raise ValueError(f"no number in {text!r}")
    return float(found.group())


def parse_query_csv(text: str) -> tuple[list[GPU], str | None]:
    """`nvidia-smi --query-gpu=... --format=csv` (with its header; units in the header or cells)."""
    rows = list(csv.reader(io.StringIO(text.strip()), skipinitialspace=True))
    if not rows:
        return [], None
    header = [h.split(" [")[0].strip() for h in rows[0]]
    gpus: list[GPU] = []
    driver = None
    for row in rows[1:]:
        cell = dict(zip(header, (c.strip() for c in row), strict=False))
        major, _, minor = cell.get("compute_cap", "0.0").partition(".")
        gpus.append(
            GPU(
                index=int(cell.get("index", len(gpus))),
                name=cell.get("name", "unknown GPU"),
                memory_bytes=int(_number(cell.get("memory.total", "0")) * MIB),
                compute_capability=(int(major), int(minor or 0)),
                uuid=cell.get("uuid", ""),
            )
        )
        driver = cell.get("driver_version") or driver
    return gpus, driver


def parse_smi_xml(text: str) -> tuple[list[GPU], str | None]:
    """`nvidia-smi -q -x`. It carries no compute capability; it is derived from the architecture."""
    root = ET.fromstring(text)  # noqa: S314
    by_arch = {
        "Volta": (7, 0),
        "Turing": (7, 5),
        "Ampere": (8, 0),
        "Ada Lovelace": (8, 9),
        "Hopper": (9, 0),
        "Blackwell": (10, 0),
    }
    gpus = []
    for i, gpu in enumerate(root.findall("gpu")):
        arch = gpu.findtext("product_architecture", "")
        gpus.append(
            GPU(
                index=i,
                name=gpu.findtext("product_name", "unknown GPU"),
                memory_bytes=int(_number(gpu.findtext("fb_memory_usage/total", "0")) * MIB),
                compute_capability=by_arch.get(arch, (0, 0)),
                uuid=gpu.findtext("uuid", ""),
            )
        )
    return gpus, root.findtext("driver_version")


def parse_probe_json(text: str) -> tuple[list[GPU], str | None]:
    """The NVML readings of a probe: `{"nvml_driver", "nvml_gpus": [{name, cc, mem_total}]}`."""
    data = json.loads(text)
    gpus = [
        GPU(
            index=i,
            name=g["name"],
            memory_bytes=int(g["mem_total"]),
            compute_capability=(int(g["cc"][0]), int(g["cc"][1])),
            uuid=g.get("uuid", ""),
        )
        for i, g in enumerate(data.get("nvml_gpus", []))
    ]
    return gpus, data.get("nvml_driver")


def parse_lscpu(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def from_captures(folder: Path) -> Hardware:
    """Hardware as captured in `folder` (the layout of tests/fixtures/hardware/*/)."""
    if not folder.is_dir():
        raise ConfigError(f"--hardware {folder}: not a folder of hardware captures")

    def text(name: str) -> str | None:
        return _read(folder / name)

    try:
        gpus: list[GPU] = []
        driver = None
        for name, parse in (
            ("probe.json", parse_probe_json),
            ("nvidia-smi-query.csv", parse_query_csv),
            ("nvidia-smi-q.xml", parse_smi_xml),
        ):
            content = text(name)
            if content and content.strip():
                gpus, driver = parse(content)
                if gpus:
                    break
        cpu, memory = _cpu_from_captures(text)
    except (ValueError, KeyError, ET.ParseError) as exc:
        raise ConfigError(f"--hardware {folder}: cannot read the captures ({exc})") from None
    return Hardware(
        cpu=cpu, memory_bytes=memory, gpus=tuple(gpus), driver=driver, source=str(folder)
    )


def _cpu_from_captures(text: Any) -> tuple[CPU, int]:
    host = text("host.txt") or ""
    lscpu = parse_lscpu(text("lscpu.txt") or "")
    cpuinfo = text("cpuinfo-head.txt") or host
    model_name, features = parse_cpuinfo(cpuinfo)
    if lscpu.get("Flags") and not features:
        features = frozenset(lscpu["Flags"].split()) & frozenset(CPU_FEATURES)
    if model_name == "unknown CPU":
        model_name = lscpu.get("Model name", model_name)
    nproc = (text("nproc.txt") or "").strip() or (host.splitlines()[0].strip() if host else "")
    cores = int(nproc) if nproc.isdigit() else int(lscpu.get("CPU(s)", "1"))
    free = text("free-b.txt") or host
    memory = parse_free_b(free) if "Mem:" in free else 0
    arch = lscpu.get("Architecture") or ("x86_64" if "x86_64" in host else platform.machine())
    return CPU(arch, model_name, cores, features), memory


def detect(captures: Path | None = None) -> Hardware:
    """The live machine, or the captures in `captures` when given."""
    if captures is not None:
        return from_captures(captures)
    cpu, memory = _live_cpu()
    found = _nvml_gpus() or _nvidia_smi_gpus() or ([], None)
    return Hardware(cpu=cpu, memory_bytes=memory, gpus=tuple(found[0]), driver=found[1])
