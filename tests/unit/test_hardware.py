"""CPU and memory detection from real captures and cgroup files."""

from __future__ import annotations

from pathlib import Path

from inferd.catalog import hardware
from tests.conftest import FIXTURES

EPYC = FIXTURES / "hardware" / "cpu-epyc-2core"


def test_cpuinfo_of_the_dev_machine() -> None:
    name, features = hardware.parse_cpuinfo((EPYC / "cpuinfo-head.txt").read_text())
    assert name == "AMD EPYC"
    assert {"avx2", "avx512f", "avx512_bf16"} <= features
    assert "amx_bf16" not in features


def test_cgroup_v2_limits(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "memory.max").write_text(str(4 * 2**30) + "\n")
    assert hardware.cgroup_cpu_limit(tmp_path) == 1.5
    assert hardware.cgroup_memory_limit(tmp_path) == 4 * 2**30


def test_cgroup_without_limits(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert hardware.cgroup_cpu_limit(tmp_path) is None
    assert hardware.cgroup_memory_limit(tmp_path) is None
    assert hardware.cgroup_cpu_limit(tmp_path / "absent") is None


def test_live_machine_has_sane_values() -> None:
    hw = hardware.detect()
    assert hw.cpu.usable_cores >= 1
    assert hw.memory_bytes > 2**30
    assert hw.cpu.arch
