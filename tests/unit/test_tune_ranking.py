"""Ranking by figures measured on this machine, and the catalog's rule for CPUs without AMX."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError

from inferd.catalog import Catalog, hardware, measured, profiles
from inferd.catalog.measured import Measurement
from tests.conftest import FIXTURES

CATALOG = Catalog.load()
SMOL = CATALOG.get("smollm2-135m-instruct")
EPYC = hardware.from_captures(FIXTURES / "hardware" / "cpu-epyc-2core")  # no AMX
H200 = hardware.from_captures(FIXTURES / "hardware" / "h200")  # a Xeon with AMX, and a GPU
NO_CUDA = {"llamacpp:gpu": "llama-server was built without CUDA"}


def m(profile: str, *, ttft: float, step1: float, step_max: float, top: int = 4) -> Measurement:
    engine = "vllm" if profile.startswith("vllm") else "llamacpp"
    return Measurement(
        model=SMOL.id,
        profile=profile,
        engine=engine,
        fingerprint=measured.fingerprint(EPYC).id,
        prompt_ms={32: ttft / 3, 128: ttft, 512: ttft * 4},
        step_ms={1: step1, top: step_max},
        ready_s=1.5 if engine == "llamacpp" else 70.0,
        measured_at="2026-12-02T14:30:00+00:00",
    )


def test_without_amx_the_q8_0_file_ranks_first_by_the_catalogs_rules() -> None:
    found = profiles.candidates(SMOL, EPYC)
    chosen = profiles.select(SMOL, EPYC, found=found)
    assert chosen.profile.id == "llamacpp-cpu-q8_0" and chosen.preferred
    why = profiles.explain(chosen, found, None, {}, model=SMOL.id)
    assert "measured faster on CPUs without amx_tile" in why
    assert why.endswith(
        "by the catalog's rules (not measured here: `inferd tune smollm2-135m-instruct`)"
    )
    assert profiles.select(SMOL, EPYC, optimize="latency").profile.id == "llamacpp-cpu-q8_0"


def test_with_amx_the_shipped_q4_1_file_stays_first() -> None:
    """The AMX machine's CPU (the H200 capture, its GPU profile out of reach without CUDA)."""
    found = profiles.candidates(SMOL, H200, unavailable=NO_CUDA)
    chosen = profiles.select(SMOL, H200, found=found)
    assert chosen.profile.id == "llamacpp-cpu-q4_1" and not chosen.preferred


def test_the_rule_names_only_known_cpu_features() -> None:
    q8 = SMOL.profile("llamacpp-cpu-q8_0")
    assert q8 is not None and q8.prefer_when_missing == ("amx_tile",)
    with pytest.raises(ValidationError, match="unknown CPU features"):
        type(q8).model_validate({**q8.model_dump(), "prefer_when_missing": ["amx"]})


def test_measured_figures_overrule_the_rules_and_say_so() -> None:
    found = profiles.candidates(SMOL, EPYC)
    # Measured here: Q4_1 finishes one user's 128/128 first (the rules say Q8_0).
    figures = {
        "llamacpp-cpu-q4_1": m("llamacpp-cpu-q4_1", ttft=150, step1=10, step_max=30),
        "llamacpp-cpu-q8_0": m("llamacpp-cpu-q8_0", ttft=250, step1=12, step_max=25),
    }
    chosen = profiles.select(SMOL, EPYC, found=found, measured=figures)
    assert chosen.profile.id == "llamacpp-cpu-q4_1"
    assert profiles.by_measurement(chosen, found, figures)
    why = profiles.explain(chosen, found, None, figures, model=SMOL.id)
    assert why.startswith("no --optimize given: measured on this machine (2026-12-02): ")
    assert "llamacpp-cpu-q4_1 128 in / 128 out in 1.42 s (first token 150 ms, 100 tok/s)" in why
    assert "llamacpp-cpu-q8_0 128 in / 128 out in 1.77 s" in why
    assert "(not measured: vllm-cpu-bf16)" in why
    assert "--optimize throughput picks vllm-cpu-bf16" in why
    # Latency ranks the same way; an unmeasured vLLM keeps heading throughput.
    assert profiles.best_by_goal(found, figures) == {
        "latency": "llamacpp-cpu-q4_1",
        "throughput": "vllm-cpu-bf16",
    }


def test_throughput_ranks_by_the_rate_at_each_profiles_own_limit() -> None:
    found = profiles.candidates(SMOL, EPYC)
    llama = {
        "llamacpp-cpu-q4_1": m("llamacpp-cpu-q4_1", ttft=150, step1=10, step_max=30),
        "llamacpp-cpu-q8_0": m("llamacpp-cpu-q8_0", ttft=250, step1=12, step_max=20),
    }
    # 32 running at 90 ms a step: 356 tok/s, against 200 tok/s for Q8_0's 4 at 20 ms.
    vllm = m("vllm-cpu-bf16", ttft=70, step1=30, step_max=90, top=32)
    figures = {**llama, "vllm-cpu-bf16": vllm}
    ranked = profiles.ranked(found, "throughput", figures)
    assert [c.profile.id for c in ranked] == [
        "vllm-cpu-bf16",
        "llamacpp-cpu-q8_0",
        "llamacpp-cpu-q4_1",
    ]
    why = profiles.explain(ranked[0], found, "throughput", figures, model=SMOL.id)
    assert "vllm-cpu-bf16 356 tok/s at 32 running" in why and "200 tok/s at 4 running" in why
    # Were vLLM slower at its limit than llama.cpp at its own, llama.cpp would serve the crowd.
    slow = {**llama, "vllm-cpu-bf16": replace(vllm, step_ms={1: 30.0, 32: 400.0})}
    assert profiles.select(SMOL, EPYC, optimize="throughput", measured=slow).profile.id == (
        "llamacpp-cpu-q8_0"
    )
    # One user: vLLM measured is still behind both llama.cpp profiles (30 ms a token).
    assert [c.profile.id for c in profiles.ranked(found, None, figures)][-1] == "vllm-cpu-bf16"


def test_one_measured_profile_alone_decides_nothing() -> None:
    found = profiles.candidates(SMOL, EPYC)
    only = {"llamacpp-cpu-q4_1": m("llamacpp-cpu-q4_1", ttft=100, step1=5, step_max=10)}
    chosen = profiles.select(SMOL, EPYC, found=found, measured=only)
    assert chosen.profile.id == "llamacpp-cpu-q8_0"
    assert "by the catalog's rules" in profiles.explain(chosen, found, None, only, model=SMOL.id)


def test_figures_of_another_engine_or_of_profiles_not_runnable_are_ignored() -> None:
    found = profiles.candidates(SMOL, EPYC)
    stale = {
        # Measured when the profile ran vLLM: meaningless for llama.cpp now.
        "llamacpp-cpu-q4_1": replace(
            m("llamacpp-cpu-q4_1", ttft=100, step1=5, step_max=10), engine="vllm"
        ),
        "llamacpp-cpu-q8_0": m("llamacpp-cpu-q8_0", ttft=250, step1=12, step_max=20),
        "llamacpp-gpu-q4_1": m("llamacpp-gpu-q4_1", ttft=10, step1=1, step_max=2),
    }
    assert set(profiles.usable(found, stale)) == {"llamacpp-cpu-q8_0"}
    assert profiles.select(SMOL, EPYC, found=found, measured=stale).profile.id == (
        "llamacpp-cpu-q8_0"
    )


def test_a_gpu_profile_still_comes_before_cpu_profiles_measured_faster() -> None:
    found = profiles.candidates(SMOL, H200)
    figures = {
        "llamacpp-cpu-q4_1": m("llamacpp-cpu-q4_1", ttft=10, step1=1, step_max=2),
        "llamacpp-cpu-q8_0": m("llamacpp-cpu-q8_0", ttft=12, step1=1, step_max=2),
    }
    assert profiles.select(SMOL, H200, found=found, measured=figures).profile.id == (
        "llamacpp-gpu-q4_1"
    )


def _zen3(profile: str, prompt_ms: dict[int, float], step_ms: dict[int, float]) -> Measurement:
    return replace(m(profile, ttft=1, step1=1, step_max=1), prompt_ms=prompt_ms, step_ms=step_ms)


def test_files_of_one_engine_close_for_one_user_are_ordered_with_four_users_too() -> None:
    """`inferd tune` on the 2-core Zen 3 (2026-12-03, in turns): Q4_1 measured 3% faster for one
    user, by a faster step; Q8_0's prompts take 40% less. Serving both, Q8_0 gave 16% more to
    one user and 30% more to four: with four users' time in the order, it comes first."""
    found = profiles.candidates(SMOL, EPYC)
    figures = {
        "llamacpp-cpu-q4_1": _zen3(
            "llamacpp-cpu-q4_1",
            {32: 129.15, 128: 554.74, 512: 2139.69, 1024: 4671.36},
            {1: 9.996, 2: 17.015, 4: 26.557},
        ),
        "llamacpp-cpu-q8_0": _zen3(
            "llamacpp-cpu-q8_0",
            {32: 76.59, 128: 319.82, 512: 1444.51, 1024: 2979.85},
            {1: 12.338, 2: 19.619, 4: 26.385},
        ),
    }
    q4, q8 = figures["llamacpp-cpu-q4_1"], figures["llamacpp-cpu-q8_0"]
    assert q4.single_user_ms() < q8.single_user_ms()  # one user alone: Q4_1, by 3%
    assert profiles.select(SMOL, EPYC, found=found, measured=figures).profile.id == (
        "llamacpp-cpu-q8_0"
    )
    why = profiles.explain(profiles.select(SMOL, EPYC, measured=figures), found, None, figures)
    assert "4 at once in 4.80 s" in why and "4 at once in 5.51 s" in why
    # Files 9% apart for one user are no tie: the one-user order stands (the catalog's Zen 4
    # figures: Q8_0 1.11 s, Q4_1 1.21 s; four users together Q4_1 5.03 s, Q8_0 5.19 s).
    zen4 = {
        p.id: _zen3(p.id, p.references[0].prompt_ms, p.references[0].step_ms)
        for p in SMOL.profiles
        if p.id in figures
    }
    assert zen4["llamacpp-cpu-q4_1"].together_ms(4) < zen4["llamacpp-cpu-q8_0"].together_ms(4)
    assert profiles.select(SMOL, EPYC, found=found, measured=zen4).profile.id == (
        "llamacpp-cpu-q8_0"
    )
    # Across engines one user's time alone still decides: a vLLM measured with fast prompts and
    # slow steps stays behind llama.cpp for one user, however well it takes four.
    vllm = _zen3("vllm-cpu-bf16", {128: 100.0, 512: 300.0}, {1: 20.0, 4: 22.0, 32: 60.0})
    order = profiles.ranked(found, None, {**figures, "vllm-cpu-bf16": vllm})
    assert [c.profile.id for c in order][-1] == "vllm-cpu-bf16"
