"""Profile selection tables against real hardware captures, and the rules behind them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from inferd.catalog import Catalog, hardware, profiles
from inferd.catalog.hardware import GPU
from inferd.catalog.profiles import INCOMPATIBLE, RUNNABLE, SMALLER
from inferd.catalog.schema import ModelEntry, Profile
from inferd.errors import NoProfileError
from tests.conftest import FIXTURES

CATALOG = Catalog.load()
H100 = hardware.from_captures(FIXTURES / "hardware" / "h100-sxm")
EPYC = hardware.from_captures(FIXTURES / "hardware" / "cpu-epyc-2core")
H200 = hardware.from_captures(FIXTURES / "hardware" / "h200")
H100X8 = replace(H100, gpus=tuple(replace(H100.gpus[0], index=i) for i in range(8)))
A100X2 = replace(
    H100, gpus=tuple(GPU(i, "NVIDIA A100-SXM4-80GB", 85_899_345_920, (8, 0)) for i in range(2))
)


def _table(model: str, hw: hardware.Hardware) -> dict[str, str]:
    return {c.profile.id: c.status for c in profiles.candidates(CATALOG.get(model), hw)}


@pytest.mark.parametrize(
    ("model", "hw", "selected", "statuses"),
    [
        # One H100: the Hopper-specific fp8 profile wins over generic bf16; two GPUs do not exist.
        (
            "llama-3.1-8b-instruct",
            H100,
            "vllm-hopper-fp8-tp1",
            {
                "vllm-hopper-fp8-tp1": RUNNABLE,
                "vllm-gpu-bf16-tp1": RUNNABLE,
                "vllm-gpu-bf16-tp2": INCOMPATIBLE,
            },
        ),
        # Eight H100s, default (throughput): fewest GPUs among the best.
        (
            "llama-3.3-70b-instruct",
            H100X8,
            "vllm-hopper-fp8-tp2",
            {
                "vllm-hopper-fp8-tp1": SMALLER,
                "vllm-hopper-fp8-tp2": RUNNABLE,
                "vllm-hopper-fp8-tp4": RUNNABLE,
                "vllm-gpu-bf16-tp4": RUNNABLE,
                "vllm-gpu-bf16-tp8": RUNNABLE,
            },
        ),
        # Two A100s: no fp8 profile (Hopper-only), bf16 needs four.
        (
            "gemma-2-27b-it",
            A100X2,
            "vllm-gpu-bf16-tp1",
            {"vllm-gpu-bf16-tp1": RUNNABLE, "vllm-gpu-bf16-tp2": RUNNABLE},
        ),
        (
            "qwen2.5-7b-instruct",
            A100X2,
            "vllm-gpu-bf16-tp1",
            {"vllm-hopper-fp8-tp1": INCOMPATIBLE, "vllm-gpu-bf16-tp1": RUNNABLE},
        ),
        # The CPU machine: CPU profiles only; with no goal given, llama.cpp's (latency) wins,
        # and of its two, on this CPU without AMX, Q8_0 (`prefer_when_missing: [amx_tile]`).
        (
            "smollm2-135m-instruct",
            EPYC,
            "llamacpp-cpu-q8_0",
            {
                "llamacpp-cpu-q8_0": RUNNABLE,
                "llamacpp-cpu-q4_1": RUNNABLE,
                "llamacpp-gpu-q4_1": INCOMPATIBLE,
                "vllm-cpu-bf16": RUNNABLE,
            },
        ),
        # The H200 machine: the GPU profile before the CPU ones (which run there too).
        (
            "smollm2-135m-instruct",
            H200,
            "llamacpp-gpu-q4_1",
            {
                "llamacpp-cpu-q8_0": RUNNABLE,
                "llamacpp-cpu-q4_1": RUNNABLE,
                "llamacpp-gpu-q4_1": RUNNABLE,
                "vllm-cpu-bf16": RUNNABLE,
            },
        ),
        ("all-minilm-l6-v2", EPYC, "vllm-cpu-fp32", {"vllm-cpu-fp32": RUNNABLE}),
    ],
)
def test_selection_tables(
    model: str, hw: hardware.Hardware, selected: str, statuses: dict[str, str]
) -> None:
    assert _table(model, hw) == statuses
    assert profiles.select(CATALOG.get(model), hw).profile.id == selected


def test_cpu_goal_picks_the_engine_and_explains_it() -> None:
    entry = CATALOG.get("smollm2-135m-instruct")
    found = profiles.candidates(entry, EPYC)
    assert profiles.best_by_goal(found) == {
        "latency": "llamacpp-cpu-q8_0",
        "throughput": "vllm-cpu-bf16",
    }
    default = profiles.select(entry, EPYC)
    why = profiles.explain(default, found, None)
    assert "no --optimize given" in why and "--optimize throughput picks vllm-cpu-bf16" in why
    chosen = profiles.select(entry, EPYC, optimize="throughput")
    assert chosen.profile.id == "vllm-cpu-bf16"
    why = profiles.explain(chosen, found, "throughput")
    assert why.startswith("--optimize throughput: vllm-cpu-bf16")
    assert "--optimize latency picks llamacpp-cpu-q8_0" in why


def test_a_single_runnable_profile_is_explained_as_such() -> None:
    entry = CATALOG.get("all-minilm-l6-v2")
    found = profiles.candidates(entry, EPYC)
    why = profiles.explain(profiles.select(entry, EPYC), found, None)
    assert why == (
        "vllm-cpu-fp32 (vllm, fp32, made for throughput) is the only profile of this model "
        "that runs here"
    )


def test_an_engine_missing_here_is_skipped_with_its_reason() -> None:
    entry = CATALOG.get("smollm2-135m-instruct")
    missing = {"llamacpp": "llama-server is not installed"}
    chosen = profiles.select(entry, EPYC, unavailable=missing)
    assert chosen.profile.id == "vllm-cpu-bf16"
    q41 = entry.profile("llamacpp-cpu-q4_1")
    assert q41 is not None
    c = profiles.check(entry, q41, EPYC, unavailable=missing)
    assert c.status == INCOMPATIBLE and "llama-server is not installed" in c.reason
    with pytest.raises(NoProfileError, match="llama-server is not installed"):
        profiles.select(entry, EPYC, "llamacpp-cpu-q8_0", unavailable=missing)


def test_a_missing_engine_still_shows_whether_the_hardware_fits() -> None:
    """Read off a live H200 without vLLM (tests/fixtures/hardware/h200): the memory estimate
    stays, so the user sees that installing the engine is all it takes."""
    entry = CATALOG.get("llama-3.1-8b-instruct")
    missing = {"vllm": "vLLM is not installed"}
    by_id = {c.profile.id: c for c in profiles.candidates(entry, H200, unavailable=missing)}
    fp8 = by_id["vllm-hopper-fp8-tp1"]
    assert fp8.status == INCOMPATIBLE and fp8.reason == "vLLM is not installed"
    assert fp8.estimate is not None and fp8.estimate.fits
    two = by_id["vllm-gpu-bf16-tp2"]  # a hardware gap: no estimate, both reasons
    assert two.estimate is None and two.reason == "needs 2 GPUs, 1 here; vLLM is not installed"


def test_one_h200_holds_the_70b_model_in_fp8() -> None:
    """141 GB of HBM3e: the fp8 70B profile that an H100 (80 GB) can only run with a shorter
    context runs whole on one H200."""
    table = _table("llama-3.3-70b-instruct", H200)
    assert table["vllm-hopper-fp8-tp1"] == RUNNABLE
    assert _table("llama-3.3-70b-instruct", H100)["vllm-hopper-fp8-tp1"] != RUNNABLE
    assert profiles.select(CATALOG.get("llama-3.3-70b-instruct"), H200).profile.id == (
        "vllm-hopper-fp8-tp1"
    )


def test_gpu_profiles_need_an_engine_built_for_gpus() -> None:
    """A llama-server without CUDA, or vLLM's CPU build, leave the GPU profiles out with the
    reason, and the CPU profiles run."""
    entry = CATALOG.get("smollm2-135m-instruct")
    missing = {"llamacpp:gpu": "llama-server was built without CUDA", "vllm:gpu": "CPU build"}
    by_id = {c.profile.id: c for c in profiles.candidates(entry, H200, unavailable=missing)}
    assert by_id["llamacpp-gpu-q4_1"].reason == "llama-server was built without CUDA"
    assert by_id["llamacpp-cpu-q4_1"].runnable and by_id["vllm-cpu-bf16"].runnable
    assert profiles.select(entry, H200, unavailable=missing).profile.id == "llamacpp-cpu-q4_1"
    llama = CATALOG.get("llama-3.1-8b-instruct")
    with pytest.raises(NoProfileError, match="CPU build"):
        profiles.select(llama, H200, unavailable=missing)


def test_latency_prefers_more_gpus() -> None:
    entry = CATALOG.get("llama-3.3-70b-instruct")
    chosen = profiles.select(entry, H100X8, optimize="latency")
    assert chosen.profile.id == "vllm-hopper-fp8-tp4"


def test_smaller_context_says_which_fits() -> None:
    entry = CATALOG.get("llama-3.3-70b-instruct")
    profile = entry.profile("vllm-hopper-fp8-tp1")
    assert profile is not None
    c = profiles.check(entry, profile, H100)
    assert c.status == SMALLER
    assert c.estimate is not None and c.estimate.fits_context is not None
    assert c.estimate.fits_context < 131072
    assert f"--max-model-len {c.estimate.fits_context}" in c.reason
    # Asking for that context makes it runnable.
    again = profiles.check(entry, c.profile, H100, context=c.estimate.fits_context)
    assert again.status == RUNNABLE


def test_no_gpu_profile_fits_the_cpu_machine_and_says_why() -> None:
    with pytest.raises(NoProfileError) as info:
        profiles.select(CATALOG.get("llama-3.1-8b-instruct"), EPYC)
    assert "needs an NVIDIA GPU; none detected" in str(info.value)
    assert "vllm-hopper-fp8-tp1" in str(info.value)


def test_named_profile_that_does_not_fit_needs_force() -> None:
    entry = CATALOG.get("llama-3.1-8b-instruct")
    with pytest.raises(NoProfileError, match="--force"):
        profiles.select(entry, H100, "vllm-gpu-bf16-tp2")
    forced = profiles.select(entry, H100, "vllm-gpu-bf16-tp2", force=True)
    assert forced.status == INCOMPATIBLE
    with pytest.raises(NoProfileError, match="has no profile 'fast'"):
        profiles.select(entry, H100, "fast")


def _with(entry: ModelEntry, *extra: Profile) -> ModelEntry:
    return entry.model_copy(update={"profiles": (*entry.profiles, *extra)})


def test_rules_order_specific_then_engine_then_precision() -> None:
    entry = CATALOG.get("mistral-7b-instruct-v0.3")
    generic_fp8 = entry.profiles[1].model_copy(update={"id": "generic-fp8", "precision": "fp8"})
    int4 = entry.profiles[1].model_copy(update={"id": "generic-int4", "precision": "int4"})
    ranked = sorted(
        (c for c in profiles.candidates(_with(entry, generic_fp8, int4), H100) if c.runnable),
        key=lambda c: profiles.rank_key(c, None),
    )
    # Hardware-specific first; then among generic ones, fp8 before bf16 before int4.
    assert [c.profile.id for c in ranked] == [
        "vllm-hopper-fp8-tp1",
        "generic-fp8",
        "vllm-gpu-bf16-tp1",
        "generic-int4",
    ]


def test_on_a_gpu_machine_the_gpu_profile_wins_every_goal() -> None:
    """The default model on the H200 capture: its GPU profile (made for latency) beat the CPU
    ones at 1 and 16 streams there, so `--optimize throughput` keeps it and says how to get the
    CPU's throughput profile."""
    entry = CATALOG.get("smollm2-135m-instruct")
    found = profiles.candidates(entry, H200)
    for goal in (None, "latency", "throughput"):
        assert profiles.select(entry, H200, optimize=goal).profile.id == "llamacpp-gpu-q4_1"
    assert profiles.best_by_goal(found) == {
        "latency": "llamacpp-gpu-q4_1",
        "throughput": "llamacpp-gpu-q4_1",
    }
    why = profiles.explain(profiles.select(entry, H200, optimize="throughput"), found, "throughput")
    assert "GPU profiles come first" in why and "--profile vllm-cpu-bf16" in why
    # Without a GPU nothing changes: the CPU goals pick as before (Q8_0: no AMX there).
    assert profiles.best_by_goal(profiles.candidates(entry, EPYC)) == {
        "latency": "llamacpp-cpu-q8_0",
        "throughput": "vllm-cpu-bf16",
    }


def test_an_engine_built_for_the_other_device_is_named_only_where_the_device_exists() -> None:
    llama = CATALOG.get("llama-3.1-8b-instruct")
    missing = {"vllm:gpu": "the installed vLLM is its CPU build"}
    on_cpu = {c.profile.id: c.reason for c in profiles.candidates(llama, EPYC, unavailable=missing)}
    assert on_cpu["vllm-gpu-bf16-tp1"] == "needs an NVIDIA GPU; none detected"
    on_h100 = profiles.candidates(
        CATALOG.get("llama-3.3-70b-instruct"), H100, unavailable={"vllm": "vLLM is not installed"}
    )
    fp8 = next(c for c in on_h100 if c.profile.id == "vllm-hopper-fp8-tp1")
    # Missing engine and a shorter context that fits: both said.
    assert fp8.reason == "vLLM is not installed; fits with --max-model-len 16384"


def test_vllm_runs_on_a_cpu_with_avx2_and_no_avx512() -> None:
    # vLLM 0.32's CPU build brings AVX2 kernels (served on this Zen 3, 2026-12-02): its CPU
    # profiles run there; a CPU without AVX2 has none.
    zen3 = hardware.from_captures(FIXTURES / "hardware" / "cpu-epyc-zen3-2core")
    assert "avx2" in zen3.cpu.features and "avx512f" not in zen3.cpu.features
    table = _table("smollm2-135m-instruct", zen3)
    assert table["vllm-cpu-bf16"] == RUNNABLE
    no_avx2 = replace(zen3, cpu=replace(zen3.cpu, features=frozenset({"fma"})))
    assert _table("smollm2-135m-instruct", no_avx2)["vllm-cpu-bf16"] == INCOMPATIBLE
    for model in ("all-minilm-l6-v2", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct"):
        vllm_cpu = [
            c for c in profiles.candidates(CATALOG.get(model), zen3) if c.profile.engine == "vllm"
            and c.profile.requires.device == "cpu"
        ]  # fmt: skip
        assert vllm_cpu and all(c.status == RUNNABLE for c in vllm_cpu), model
