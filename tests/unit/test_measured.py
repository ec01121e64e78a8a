"""Figures measured on a machine: the fingerprint, the curves read from them, the store."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from inferd.cache import ModelStore
from inferd.catalog import hardware, measured
from inferd.catalog.measured import Measurement
from tests.conftest import FIXTURES

EPYC = hardware.from_captures(FIXTURES / "hardware" / "cpu-epyc-2core")
H200 = hardware.from_captures(FIXTURES / "hardware" / "h200")


def figures(**changes: object) -> Measurement:
    m = Measurement(
        model="smollm2-135m-instruct",
        profile="llamacpp-cpu-q8_0",
        engine="llamacpp",
        fingerprint=measured.fingerprint(EPYC).id,
        prompt_ms={32: 60.0, 128: 200.0, 512: 800.0, 1024: 1700.0},
        step_ms={1: 12.5, 2: 15.0, 4: 25.0},
        ready_s=1.8,
        measured_at="2026-12-02T14:00:00+00:00",
    )
    return replace(m, **changes)  # type: ignore[arg-type]


def test_prompt_time_interpolates_and_extends_both_ends() -> None:
    m = figures()
    assert m.prompt_time(128) == 200.0
    assert m.prompt_time(320) == pytest.approx(500.0)  # halfway between 128 and 512
    assert m.prompt_time(2048) == pytest.approx(1700.0 + 1024 * 900 / 512)
    assert m.prompt_time(16) == pytest.approx(60.0 - 16 * 140 / 96)
    assert m.prompt_time(0) == pytest.approx(60.0 - 32 * 140 / 96)
    # Never negative, however far below the first point.
    assert replace(m, prompt_ms={100: 10.0, 200: 500.0}).prompt_time(1) == 0.0


def test_step_time_and_rate_by_requests_running() -> None:
    m = figures()
    assert m.step_time(1) == 12.5 and m.step_time(0) == 12.5
    assert m.step_time(3) == pytest.approx(20.0)
    assert m.step_time(8) == pytest.approx(25.0 + 4 * 5.0)  # the last segment, extended
    assert m.rate(1) == pytest.approx(80.0)
    assert m.rate(4) == pytest.approx(160.0)
    # A noisy last pair (more running, shorter steps) is not extended downwards.
    noisy = replace(m, step_ms={1: 12.5, 2: 20.0, 4: 18.0})
    assert noisy.step_time(16) == pytest.approx(18.0)
    one = replace(m, step_ms={1: 10.0})
    assert one.step_time(4) == 10.0 and one.rate(4) == pytest.approx(400.0)


def test_single_user_time_is_the_prompt_then_a_step_per_further_token() -> None:
    m = figures()
    assert m.single_user_ms() == pytest.approx(200.0 + 127 * 12.5)
    assert m.single_user_ms(512, 2) == pytest.approx(800.0 + 12.5)


def test_fingerprint_is_stable_short_and_tells_machines_apart() -> None:
    fp = measured.fingerprint(EPYC)
    assert fp == measured.fingerprint(
        hardware.from_captures(FIXTURES / "hardware" / "cpu-epyc-2core")
    )
    assert len(fp.id) == 12 and int(fp.id, 16) >= 0
    assert "AMD EPYC" in fp.description and "2 usable cores" in fp.description
    assert "avx512_bf16" in fp.description and "no GPU" in fp.description
    gpu = measured.fingerprint(H200)
    assert gpu.id != fp.id and "1 x NVIDIA H200" in gpu.description
    # What changes speed changes the id: cores, CPU features; memory does not.
    fewer = replace(EPYC, cpu=replace(EPYC.cpu, usable_cores=1))
    amx = replace(EPYC, cpu=replace(EPYC.cpu, features=EPYC.cpu.features | {"amx_tile"}))
    assert len({fp.id, measured.fingerprint(fewer).id, measured.fingerprint(amx).id}) == 3
    assert measured.fingerprint(replace(EPYC, memory_bytes=1)).id == fp.id


def test_store_round_trip_keeps_every_profile_and_machine_apart(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    fp = measured.fingerprint(EPYC)
    assert measured.load(store, fp, "smollm2-135m-instruct") == {}
    q8 = figures()
    q4 = figures(profile="llamacpp-cpu-q4_1", step_ms={1: 14.0, 4: 30.0})
    measured.save(store, q8, fp.description)
    measured.save(store, q4)
    loaded = measured.load(store, fp, "smollm2-135m-instruct")
    assert loaded == {"llamacpp-cpu-q8_0": q8, "llamacpp-cpu-q4_1": q4}
    file = measured.path(store, fp)
    assert file == tmp_path / "measurements" / f"{fp.id}.json"
    assert json.loads(file.read_text())["description"] == fp.description
    # A new measurement of a profile replaces its old one; other models and machines are apart.
    measured.save(store, replace(q8, ready_s=2.5))
    assert measured.load(store, fp, "smollm2-135m-instruct")["llamacpp-cpu-q8_0"].ready_s == 2.5
    assert measured.load(store, fp, "gemma-3-270m") == {}
    assert measured.load(store, measured.fingerprint(H200), "smollm2-135m-instruct") == {}
    assert [p.name for p in file.parent.iterdir() if not p.name.startswith(".lock")] == [
        file.name
    ]  # no staging file left behind


def test_a_damaged_or_foreign_file_reads_as_not_measured(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    fp = measured.fingerprint(EPYC)
    file = measured.path(store, fp)
    file.parent.mkdir(parents=True)
    file.write_text("{not json")
    assert measured.load(store, fp, "smollm2-135m-instruct") == {}
    file.write_text(json.dumps({"format": 999, "models": {}}))
    assert measured.load(store, fp, "smollm2-135m-instruct") == {}
    measured.save(store, figures())  # and is replaced by a good one
    assert list(measured.load(store, fp, "smollm2-135m-instruct")) == ["llamacpp-cpu-q8_0"]
