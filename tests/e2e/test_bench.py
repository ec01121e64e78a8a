"""`inferd bench` against a real `inferd serve` (llama.cpp profile, 2 slots, no queue).

Sane numbers: every latency positive, token counts from the server's usage, goodput under an SLO;
failures counted: a level above what admission control lets in gets some 503s, and the run says
how many. Its report renders a PNG."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import INFERD, LLAMACPP_PROFILE, MODEL, Served, cache_path, start

pytestmark = pytest.mark.e2e
PROMPTS = 6
OUTPUT_LEN = 16


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = start(
        tmp_path_factory.mktemp("bench"),
        "--profile",
        LLAMACPP_PROFILE,
        "--max-running",
        "2",
        "--max-queue",
        "0",
    )
    served.wait_ready()
    yield served
    served.stop()


def _bench(served: Served, out: Path, concurrency: str, *extra: str) -> dict[str, Any]:
    done = subprocess.run(
        [
            INFERD,
            "bench",
            "--url",
            served.url,
            "--model",
            MODEL,
            "--cache-path",
            str(cache_path()),
            "--concurrency",
            concurrency,
            "--input-len",
            "32",
            "--output-len",
            str(OUTPUT_LEN),
            "--prompts",
            str(PROMPTS),
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(out.with_suffix(".json").read_text())
    return data


def test_bench_numbers_are_sane_and_the_report_renders(small: Served, tmp_path: Path) -> None:
    run = _bench(
        small, tmp_path / "run", "1,2", "--slo", "ttft=60000,itl=60000", "--label", "smoke-run"
    )
    levels = run["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for level in levels:
        assert level["completed"] == PROMPTS and level["failed"] == 0
        # ignore_eos: every request generates exactly OUTPUT_LEN tokens, counted from usage.
        assert level["total_output_tokens"] == PROMPTS * OUTPUT_LEN
        assert level["total_input_tokens"] > 0
        for name in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "median_e2el_ms"):
            assert level[name] > 0, name
        assert level["p99_ttft_ms"] >= level["median_ttft_ms"]
        assert level["median_e2el_ms"] > level["median_ttft_ms"]
        assert level["output_throughput"] > 0
        # Limits of a minute: every request meets them.
        assert level["request_goodput"] == pytest.approx(level["request_throughput"], rel=0.01)
    csv = (tmp_path / "run.csv").read_text().splitlines()
    assert csv[0].startswith("concurrency,request_rate,completed,failed") and len(csv) == 3

    png = tmp_path / "compare.png"
    report = subprocess.run(
        [INFERD, "bench", "report", str(tmp_path / "run.json"), "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    assert "smoke-run" in report.stdout and "TTFT" in report.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bench_counts_refused_requests_as_failed(small: Served, tmp_path: Path) -> None:
    # Six at once against two slots and no queue: admission control refuses some with 503.
    run = _bench(small, tmp_path / "over", "6")
    levels = run["levels"]
    assert len(levels) == 1
    level = levels[0]
    assert level["completed"] + level["failed"] == PROMPTS
    assert level["failed"] > 0 and level["completed"] >= 2
    assert level["total_output_tokens"] == level["completed"] * OUTPUT_LEN


def test_bench_refuses_bad_levels_in_one_line() -> None:
    done = subprocess.run(
        [INFERD, "bench", "--concurrency", "1,x"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "--concurrency" in done.stderr
