"""Several models in one service: each model's profile, and whether they fit together."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from inferd.catalog import Catalog
from inferd.catalog.estimate import GiB
from inferd.cli.plan import check_fit_together, profile_choices, resolve, resolve_all
from inferd.config import Settings, load_settings
from inferd.errors import UsageError
from tests.conftest import FIXTURES

CATALOG = Catalog.load()
CHAT, EMBED = CATALOG.get("smollm2-135m-instruct"), CATALOG.get("all-minilm-l6-v2")
EPYC = FIXTURES / "hardware" / "cpu-epyc-2core"


def _plans(tmp_path: Path, model: str, **flags: str) -> list[str]:
    settings = load_settings(
        {"model": model, "hardware": str(EPYC), "cache_path": str(tmp_path), **flags},
        env={},
    )
    return [f"{p.entry.id}:{p.chosen.profile.id}" for p in resolve_all(settings)]


def test_profile_choices_by_id_or_pairs() -> None:
    both = [CHAT, EMBED]
    assert profile_choices("default", both) == {CHAT.id: "default", EMBED.id: "default"}
    # A profile only one of the models has needs no model name.
    assert profile_choices("vllm-cpu-fp32", both)[EMBED.id] == "vllm-cpu-fp32"
    pairs = profile_choices(f"{CHAT.id}=llamacpp-cpu-q8_0,{EMBED.id}=vllm-cpu-fp32", both)
    assert pairs == {CHAT.id: "llamacpp-cpu-q8_0", EMBED.id: "vllm-cpu-fp32"}
    assert profile_choices("anything", [CHAT]) == {CHAT.id: "anything"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("nope", "belongs to none"),
        ("other-model=vllm-cpu-fp32", "not served here"),
    ],
)
def test_profile_choices_refuse_what_names_no_served_model(text: str, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        profile_choices(text, [CHAT, EMBED])


def test_two_models_each_get_their_own_profile(tmp_path: Path) -> None:
    plans = _plans(tmp_path, f"{CHAT.id},{EMBED.id}", profile=f"{CHAT.id}=vllm-cpu-bf16")
    assert plans == [f"{CHAT.id}:vllm-cpu-bf16", f"{EMBED.id}:vllm-cpu-fp32"]


@pytest.mark.parametrize(
    ("model", "flags", "words"),
    [
        (f"{CHAT.id},{CHAT.id}", {}, "named twice"),
        (f"{CHAT.id},{EMBED.id}", {"engine_args": "--foo"}, "--engine-args applies to one"),
        (f"{CHAT.id},{EMBED.id}", {"max_model_len": "1024"}, "--max-model-len applies to one"),
    ],
)
def test_what_cannot_apply_to_several_models_is_refused(
    tmp_path: Path, model: str, flags: dict[str, str], words: str
) -> None:
    with pytest.raises(UsageError, match=words):
        _plans(tmp_path, model, **flags)


def test_engine_args_in_an_engines_section_go_to_each_of_its_models(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "model": f"{CHAT.id},{EMBED.id}",
            "profile": f"{CHAT.id}=llamacpp-cpu-q8_0",
            "hardware": str(EPYC),
            "cache_path": str(tmp_path),
            "engine_args": "vllm: --enforce-eager llamacpp: --mlock",
        },
        env={},
    )
    chat, embed = resolve_all(settings)
    assert chat.engine(settings).extra_args == ["--mlock"]
    assert embed.engine(settings).extra_args == ["--enforce-eager"]


def test_models_that_fit_alone_but_not_together_are_refused_with_the_estimate(
    tmp_path: Path,
) -> None:
    # One engine per model (the default would run both of the chat model's CPU engines).
    settings = load_settings(
        {
            "model": f"{CHAT.id},{EMBED.id}",
            "hardware": str(EPYC),
            "cache_path": str(tmp_path),
            "optimize": "latency",
        },
        env={},
    )
    plans = resolve_all(settings)  # 23.5 GiB: both fit
    # The same two on a host with 5 GiB: each fits alone (2.8 and 2.3 GiB), not both.
    small = [
        replace(p, chosen=replace(p.chosen, estimate=replace(p.chosen.estimate, available=5 * GiB)))
        for p in plans
        if p.chosen.estimate
    ]
    assert all(p.chosen.estimate and p.chosen.estimate.total < 5 * GiB for p in small)
    with pytest.raises(UsageError) as info:
        check_fit_together(small)
    message = info.value.message
    assert "do not fit in host memory together: they need 5.2 GiB" in message
    assert f"{CHAT.id} (llamacpp-cpu-q8_0)" in message and "5.0 GiB usable" in message


def test_gpu_engines_must_share_each_gpu(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "model": "llama-3.1-8b-instruct,mistral-7b-instruct-v0.3",
            "hardware": str(FIXTURES / "hardware" / "h100-sxm"),
            "cache_path": str(tmp_path),
        },
        env={},
    )
    # Each fits the 80 GB card alone, but each vLLM engine claims 0.9 of it.
    with pytest.raises(UsageError, match=r"would claim 1\.80 of each GPU together"):
        resolve_all(settings)


def _settings(tmp_path: Path, **flags: str) -> Settings:
    return load_settings(
        {"model": CHAT.id, "hardware": str(EPYC), "cache_path": str(tmp_path), **flags}, env={}
    )


def test_a_combined_profile_runs_by_name_with_each_engines_profile(tmp_path: Path) -> None:
    plan = resolve(_settings(tmp_path, profile="cpu-both"), entry=CHAT)
    assert plan.profile_id == "cpu-both" and plan.combined is not None
    assert [p.profile.id for p in plan.engines_run] == ["llamacpp-cpu-q8_0", "vllm-cpu-bf16"]
    # Adapters run on both engines, and models on demand load both.
    adapters = resolve(_settings(tmp_path, profile="cpu-both", lora_path=str(tmp_path)), entry=CHAT)
    assert adapters.profile_id == "cpu-both"
    on_demand = resolve(_settings(tmp_path, profile="cpu-both", max_loaded="1"), entry=CHAT)
    assert on_demand.profile_id == "cpu-both" and len(on_demand.engines_run) == 2


def test_the_default_runs_a_combined_profile_only_where_the_catalog_says(tmp_path: Path) -> None:
    # cpu-both is the default model's CPU default (its benchmark held on a 2-core Xeon with AMX).
    plan = resolve(_settings(tmp_path), entry=CHAT)
    assert plan.profile_id == "cpu-both" and "both engines behind one model" in plan.why
    assert [p.profile.id for p in plan.engines_run] == ["llamacpp-cpu-q8_0", "vllm-cpu-bf16"]
    # A goal pins one engine; models on demand and adapters keep both.
    assert resolve(_settings(tmp_path, optimize="latency"), entry=CHAT).combined is None
    assert resolve(_settings(tmp_path, max_loaded="1"), entry=CHAT).combined is not None
    assert resolve(_settings(tmp_path, lora_path=str(tmp_path)), entry=CHAT).combined is not None
    # Not marked: the best single profile.
    unmarked = CHAT.model_copy(
        update={"combined": tuple(c.model_copy(update={"default": False}) for c in CHAT.combined)}
    )
    assert resolve(_settings(tmp_path), entry=unmarked).profile_id == "llamacpp-cpu-q8_0"
