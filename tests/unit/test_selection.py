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
        # and of its two the measured priority picks the shipped Q4_1 file.
        (
            "smollm2-135m-instruct",
            EPYC,
            "llamacpp-cpu-q4_1",
            {
                "llamacpp-cpu-q8_0": RUNNABLE,
                "llamacpp-cpu-q4_1": RUNNABLE,
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
        "latency": "llamacpp-cpu-q4_1",
        "throughput": "vllm-cpu-bf16",
    }
    default = profiles.select(entry, EPYC)
    why = profiles.explain(default, found, None)
    assert "no --optimize given" in why and "--optimize throughput picks vllm-cpu-bf16" in why
    chosen = profiles.select(entry, EPYC, optimize="throughput")
    assert chosen.profile.id == "vllm-cpu-bf16"
    why = profiles.explain(chosen, found, "throughput")
    assert why.startswith("--optimize throughput: vllm-cpu-bf16")
    assert "--optimize latency picks llamacpp-cpu-q4_1" in why


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
