"""`inferd tune` measures profiles with their real engines, and the ranking then uses the figures.

The measurements go into a cache of the test's own (its `blobs` and `models` are the shared
test cache's, linked), so the shared cache never holds figures that would change what other
tests' servers pick.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import INFERD, MODEL, cache_path

pytestmark = pytest.mark.e2e

PROFILES = ("llamacpp-cpu-q4_1", "llamacpp-cpu-q8_0")


def _inferd(*args: str, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # Wide enough for every column of `inferd profiles` (rich cuts headers to the width).
    env = {**os.environ, "INFERD_CACHE_PATH": str(cache), "COLUMNS": "200"}
    done = subprocess.run(
        [INFERD, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_tune_measures_stores_and_the_ranking_says_so(tmp_path: Path) -> None:
    shared = cache_path()
    for profile in PROFILES:  # the model folders, once, in the shared cache
        _inferd("cache", "pull", MODEL, "--profile", profile, cache=shared, timeout=600)
    cache = tmp_path / "cache"
    cache.mkdir()
    for folder in ("blobs", "models"):
        (cache / folder).symlink_to(shared / folder)

    named = [word for profile in PROFILES for word in ("--profile", profile)]
    tuned = json.loads(_inferd("tune", MODEL, *named, "--json", cache=cache, timeout=600).stdout)
    assert [r["profile"] for r in tuned["profiles"]] == list(PROFILES)
    # Measured again in turns when they came close for one user: both, or neither.
    assert len({r["in_turns"] for r in tuned["profiles"]}) == 1
    for row in tuned["profiles"]:
        assert set(row["prompt_ms"]) == {"32", "128", "512", "1024"}
        assert set(row["step_ms"]) == {"1", "2", "4"}  # capped at the profiles' 4 slots
        assert all(v > 0 for v in (row["tok_s_1"], row["tok_s_max"], row["ttft_128_ms"]))
        assert 0 < row["ready_s"] < row["took_s"]
        # A longer prompt takes longer (1024 against 32 tokens: no noise hides 32 times more).
        assert row["prompt_ms"]["1024"] > row["prompt_ms"]["32"]
    assert tuned["took_s"] >= sum(r["took_s"] for r in tuned["profiles"])
    fp = tuned["fingerprint"]
    assert len(fp["id"]) == 12 and "usable cores" in fp["description"]
    stored = cache / "measurements" / f"{fp['id']}.json"
    assert tuned["stored"] == str(stored) and stored.is_file()
    assert not (shared / "measurements" / stored.name).exists()

    listing = json.loads(_inferd("profiles", MODEL, "--json", cache=cache).stdout)
    assert listing["ranked_by"] == "measurements"
    assert listing["fingerprint"]["id"] == fp["id"]
    rows = {r["id"]: r for r in listing["profiles"]}
    for row in tuned["profiles"]:
        shown = rows[row["profile"]]["measured"]
        assert shown["tok_s_1"] == row["tok_s_1"] and shown["ttft_128_ms"] == row["ttft_128_ms"]
    assert rows["vllm-cpu-bf16"]["measured"] is None
    assert "measured on this machine" in listing["why"]
    # What serve runs: both engines behind the model, llama.cpp's profile the one the figures
    # measured here rank first for one user.
    assert listing["selected"] == "cpu-both"
    both = {c["id"]: c for c in listing["combined"]}["cpu-both"]
    assert both["selected"] and both["engines"][0]["profile"] in PROFILES
    assert both["engines"][0]["profile"] == listing["by_goal"]["latency"]
    table = _inferd("profiles", MODEL, cache=cache).stdout
    assert "TTFT 128" in table and "ranked by figures measured on this machine" in table

    plan = json.loads(_inferd("serve", MODEL, "--dry-run", "--json", cache=cache).stdout)
    assert "measured on this machine" in plan["profile"]["why"]
    # A cache without figures (the same models) ranks by the catalog's rules, and says how to
    # measure.
    untuned = tmp_path / "untuned"
    untuned.mkdir()
    (untuned / "models").symlink_to(shared / "models")
    plain = json.loads(_inferd("profiles", MODEL, "--json", cache=untuned).stdout)
    assert plain["ranked_by"] == "catalog" and f"`inferd tune {MODEL}`" in plain["why"]
