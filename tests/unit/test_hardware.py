"""Hardware detection: real captures from the H100 machine and the 2-core dev machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inferd.catalog import hardware
from inferd.errors import ConfigError
from tests.conftest import FIXTURES

H100 = FIXTURES / "hardware" / "h100-sxm"
EPYC = FIXTURES / "hardware" / "cpu-epyc-2core"
H200 = FIXTURES / "hardware" / "h200"


def test_h100_from_captures() -> None:
    hw = hardware.from_captures(H100)
    assert len(hw.gpus) == 1
    gpu = hw.gpus[0]
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.compute_capability == (9, 0)
    assert gpu.family == "hopper"
    assert gpu.memory_bytes == 85520809984  # NVML's reading in probe.json
    assert hw.driver == "580.159.04"
    assert hw.cpu.usable_cores == 16
    assert hw.memory_bytes == 135148564480
    assert {"avx512f", "avx512_bf16", "amx_bf16"} <= hw.cpu.features


def test_every_gpu_capture_format_agrees() -> None:
    from_csv, driver = hardware.parse_query_csv((H100 / "nvidia-smi-query.csv").read_text())
    from_xml, _ = hardware.parse_smi_xml((H100 / "nvidia-smi-q.xml").read_text())
    from_probe, _ = hardware.parse_probe_json((H100 / "probe.json").read_text())
    assert driver == "580.159.04"
    for gpus in (from_csv, from_xml):
        assert [(g.name, g.compute_capability) for g in gpus] == [("NVIDIA H100 80GB HBM3", (9, 0))]
        # nvidia-smi reports MiB of usable framebuffer: within 1% of NVML's byte count.
        assert gpus[0].memory_bytes == pytest.approx(from_probe[0].memory_bytes, rel=0.01)


def test_h200_captures_agree_with_what_inferd_read_live_there() -> None:
    """capture.sh ran on a live H200: NVML, nvidia-smi alone and the captured files gave inferd
    the same GPU; the files still do."""
    live = json.loads((H200 / "inferd-detect.json").read_text())
    assert live["nvml"] == live["nvidia_smi"]
    assert live["live"]["gpus"] == live["captures"]["gpus"]
    hw = hardware.from_captures(H200)
    assert hw.as_dict()["gpus"] == live["live"]["gpus"]
    gpu = hw.gpus[0]
    assert (gpu.name, gpu.family, gpu.compute_capability) == ("NVIDIA H200", "hopper", (9, 0))
    assert gpu.memory_bytes == live["nvml"][0]["memory_bytes"] == 143771 * 2**20
    assert hw.driver == "580.159.04" and hw.cpu.usable_cores == 16
    from_xml, driver = hardware.parse_smi_xml((H200 / "nvidia-smi-q.xml").read_text())
    assert [(g.name, g.memory_bytes) for g in from_xml] == [("NVIDIA H200", gpu.memory_bytes)]
    assert driver == hw.driver


def test_cpu_machine_from_captures() -> None:
    hw = hardware.from_captures(EPYC)
    assert hw.gpus == ()
    assert hw.cpu.model_name == "AMD EPYC"
    assert hw.cpu.usable_cores == 2
    assert hw.cpu.arch == "x86_64"
    assert hw.memory_bytes == 25276510208
    assert "no NVIDIA GPU" in hw.summary()


def test_not_a_capture_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a folder"):
        hardware.from_captures(tmp_path / "missing")
    (tmp_path / "probe.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the captures"):
        hardware.from_captures(tmp_path)


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
