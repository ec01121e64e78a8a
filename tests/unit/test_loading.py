"""Models on demand (`server.loading`): the pool's policy over engines that start and stop.

A stand-in supervisor is enough here: the policy (LRU, pins, idleness, the memory estimate,
concurrent first requests, requests never cut, load timeouts and failures) is the pool's own; the
real engines are started and stopped by tests/e2e/test_on_demand.py.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from inferd.catalog import Catalog
from inferd.catalog.estimate import GiB
from inferd.cli.plan import fit_check, resolve_all
from inferd.config import load_settings
from inferd.errors import ConfigError, DrainingError, EngineNotReadyError
from inferd.observability.metrics import Metrics
from inferd.server.loading import FitCheck, LoadState, ModelPool, Policy
from inferd.server.served import ServedModel
from inferd.server.supervisor import Supervisor
from tests.conftest import FIXTURES


class FakeSupervisor:
    """Starts in `load_s` (or fails), stops in `stop_s`; counts both."""

    def __init__(self, load_s: float = 0.02, stop_s: float = 0.0, fail: bool = False) -> None:
        self.load_s, self.stop_s, self.fail = load_s, stop_s, fail
        self.ready = asyncio.Event()
        self.failed = asyncio.Event()
        self.last_error: str | None = None
        self.starts = self.stops = 0
        self.running = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        assert not self.running, "started twice without a stop"
        self.starts += 1
        self.running = True
        self.failed.clear()
        self._timer = asyncio.get_running_loop().call_later(self.load_s, self._up)

    def _up(self) -> None:
        if self.fail:
            self.last_error = "engine exited with code 1 before it was ready"
            self.failed.set()
        else:
            self.ready.set()

    async def stop(self) -> None:
        self.stops += 1
        if self._timer is not None:
            self._timer.cancel()
        await asyncio.sleep(self.stop_s)
        self.ready.clear()
        self.running = False


ENTRY = Catalog.load().get("smollm2-135m-instruct")


def _model(name: str, sup: FakeSupervisor) -> ServedModel:
    entry = ENTRY.model_copy(update={"id": name})
    return ServedModel(entry, entry.profiles[0], cast(Supervisor, sup))


def _pool(
    sups: dict[str, FakeSupervisor],
    *,
    max_loaded: int | None = None,
    idle_s: float | None = None,
    pinned: tuple[str, ...] = (),
    timeout_s: float = 5.0,
    fits: FitCheck | None = None,
) -> tuple[ModelPool, dict[str, ServedModel], Metrics]:
    models = {name: _model(name, sup) for name, sup in sups.items()}
    metrics = Metrics()
    policy = Policy(max_loaded, idle_s, frozenset(pinned), timeout_s)
    pool = ModelPool(models.values(), policy, metrics, fits)
    pool.open()
    return pool, models, metrics


def _sample(metrics: Metrics, name: str, **labels: Any) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_two_first_requests_start_the_model_once() -> None:
    sups = {"a": FakeSupervisor(load_s=0.1)}
    pool, models, metrics = _pool(sups)
    assert pool.state("a") is LoadState.UNLOADED and sups["a"].starts == 0  # nothing at start
    leases = await asyncio.gather(pool.use(models["a"]), pool.use(models["a"]))
    assert sups["a"].starts == 1 and pool.state("a") is LoadState.LOADED
    assert _sample(metrics, "inferd_model_loads_total", model="a") == 1
    assert _sample(metrics, "inferd_model_load_seconds_count", model="a") == 1
    for lease in leases:
        lease.release()
    await pool.shutdown()


async def test_least_recently_used_idle_model_makes_room() -> None:
    sups = {n: FakeSupervisor() for n in "abc"}
    pool, models, metrics = _pool(sups, max_loaded=2)
    (await pool.use(models["a"])).release()
    (await pool.use(models["b"])).release()
    (await pool.use(models["a"])).release()  # a used last: b is the least recent
    (await pool.use(models["c"])).release()
    assert [pool.state(n) for n in "abc"] == [
        LoadState.LOADED,
        LoadState.UNLOADED,
        LoadState.LOADED,
    ]
    assert (sups["a"].stops, sups["b"].stops) == (0, 1)
    assert _sample(metrics, "inferd_model_unloads_total", model="b", reason="evicted") == 1
    await pool.shutdown()


async def test_a_model_in_use_is_never_stopped_under_its_request() -> None:
    sups = {n: FakeSupervisor() for n in "ab"}
    pool, models, _ = _pool(sups, max_loaded=1)
    held = await pool.use(models["a"])
    waiting = asyncio.create_task(pool.use(models["b"]))
    await asyncio.sleep(0.2)
    assert not waiting.done() and sups["a"].stops == 0  # b waits for a's request to end
    assert pool.state("b") is LoadState.LOADING
    more = await pool.use(models["a"])  # a request for the loaded model is served meanwhile
    more.release()
    held.release()
    (await asyncio.wait_for(waiting, 2)).release()
    assert sups["a"].stops == 1 and pool.state("b") is LoadState.LOADED
    await pool.shutdown()


async def test_pinned_models_load_at_start_and_stay() -> None:
    sups = {n: FakeSupervisor() for n in "abc"}
    pool, models, _ = _pool(sups, max_loaded=2, pinned=("a",))
    await asyncio.sleep(0.1)
    assert pool.state("a") is LoadState.LOADED and sups["a"].starts == 1  # no request needed
    (await pool.use(models["b"])).release()
    (await pool.use(models["c"])).release()  # a is older, but pinned: b goes
    assert (sups["a"].stops, sups["b"].stops) == (0, 1)
    await pool.shutdown()


async def test_idle_models_unload_after_idle_seconds() -> None:
    sups = {n: FakeSupervisor() for n in "ab"}
    pool, models, metrics = _pool(sups, idle_s=0.3, pinned=("b",))
    lease = await pool.use(models["a"])
    await asyncio.sleep(0.6)
    assert pool.state("a") is LoadState.LOADED  # held by a request: not idle
    lease.release()
    await asyncio.sleep(0.8)
    assert pool.state("a") is LoadState.UNLOADED and not sups["a"].running
    assert pool.state("b") is LoadState.LOADED  # pinned: never idle-unloaded
    assert _sample(metrics, "inferd_model_unloads_total", model="a", reason="idle") == 1
    await pool.shutdown()


async def test_a_slow_load_answers_503_with_retry_after_and_goes_on() -> None:
    sups = {"a": FakeSupervisor(load_s=0.5)}
    pool, models, _ = _pool(sups, timeout_s=0.1)
    with pytest.raises(EngineNotReadyError) as info:
        await pool.use(models["a"])
    assert info.value.status == 503 and "Retry-After" in info.value.headers()
    assert "still loading" in info.value.message
    await asyncio.sleep(0.6)
    assert pool.state("a") is LoadState.LOADED  # the load went on
    (await pool.use(models["a"])).release()
    assert sups["a"].starts == 1
    await pool.shutdown()


async def test_retry_after_is_what_is_left_of_the_load_under_way() -> None:
    sups = {"a": FakeSupervisor(load_s=60)}
    pool, models, _ = _pool(sups, timeout_s=0.05)
    with pytest.raises(EngineNotReadyError) as info:  # a first load: its time is unknown
        await pool.use(models["a"])
    assert info.value.headers()["Retry-After"] == "5"
    # Had a load taken 30 s, one under way for 10 s has 20 s left (not 30 more).
    loading = pool._residents["a"]
    assert loading.state is LoadState.LOADING and loading.load_began is not None
    loading.load_seconds = 30.0
    loading.load_began -= 10
    assert pool._retry_after(loading) == 20
    loading.load_began -= 25  # overdue: ask again shortly
    assert pool._retry_after(loading) == 5
    await pool.shutdown()


async def test_a_failed_load_is_refused_with_the_reason_and_retried_later() -> None:
    sups = {"a": FakeSupervisor(fail=True)}
    pool, models, metrics = _pool(sups)
    with pytest.raises(EngineNotReadyError, match="could not be loaded: engine exited"):
        await pool.use(models["a"])
    assert pool.state("a") is LoadState.UNLOADED and sups["a"].stops == 1  # cleaned up
    assert _sample(metrics, "inferd_model_load_failures_total", model="a") == 1
    with pytest.raises(EngineNotReadyError):
        await pool.use(models["a"])
    assert sups["a"].starts == 2  # the next request tries again
    await pool.shutdown()


async def test_the_memory_estimate_makes_room_too() -> None:
    sups = {n: FakeSupervisor() for n in "ab"}

    def fits(ids: list[str]) -> str | None:
        return "a and b need 9 GiB, 8 usable" if {"a", "b"} <= set(ids) else None

    pool, models, _ = _pool(sups, fits=fits)  # no count limit
    (await pool.use(models["a"])).release()
    (await pool.use(models["b"])).release()
    assert pool.state("a") is LoadState.UNLOADED and pool.state("b") is LoadState.LOADED
    await pool.shutdown()


async def test_a_model_that_cannot_fit_beside_the_pinned_ones_is_refused_at_once() -> None:
    sups = {n: FakeSupervisor() for n in "ab"}

    def fits(ids: list[str]) -> str | None:
        return "too big together" if {"a", "b"} <= set(ids) else None

    pool, models, _ = _pool(sups, pinned=("a",), fits=fits)
    await asyncio.sleep(0.1)
    with pytest.raises(EngineNotReadyError, match="does not fit beside the pinned models"):
        await asyncio.wait_for(pool.use(models["b"]), 2)
    assert sups["b"].starts == 0
    await pool.shutdown()


async def test_a_request_for_a_model_being_unloaded_waits_and_loads_it_again() -> None:
    sups = {"a": FakeSupervisor(stop_s=0.3), "b": FakeSupervisor()}
    pool, models, _ = _pool(sups, max_loaded=1)
    (await pool.use(models["a"])).release()
    b = asyncio.create_task(pool.use(models["b"]))
    await asyncio.sleep(0.1)
    assert pool.state("a") is LoadState.UNLOADING
    a = asyncio.create_task(pool.use(models["a"]))
    (await b).release()
    (await asyncio.wait_for(a, 2)).release()
    assert sups["a"].starts == 2 and pool.state("a") is LoadState.LOADED
    assert not sups["b"].running  # b made room for a in turn
    await pool.shutdown()


async def test_the_drain_refuses_requests_waiting_for_a_load() -> None:
    sups = {n: FakeSupervisor(load_s=1.0) for n in "ab"}
    pool, models, _ = _pool(sups)
    (await asyncio.wait_for(_loaded(pool, models["b"]), 3)).release()
    waiting = asyncio.create_task(pool.use(models["a"]))
    await asyncio.sleep(0.05)
    pool.close("the service is shutting down")
    with pytest.raises(DrainingError):
        await waiting
    (await pool.use(models["b"])).release()  # a loaded model still serves what arrived before
    await pool.shutdown()


async def _loaded(pool: ModelPool, model: ServedModel) -> Any:
    return await pool.use(model)


async def test_many_concurrent_requests_over_three_models_one_loaded() -> None:
    sups = {n: FakeSupervisor(load_s=0.02) for n in "abc"}
    pool, models, _ = _pool(sups, max_loaded=1)
    loaded_at_once: list[int] = []

    async def request(name: str) -> None:
        lease = await pool.use(models[name])
        loaded_at_once.append(sum(s.running for s in sups.values()))
        assert sups[name].running and sups[name].ready.is_set()
        await asyncio.sleep(0.01)
        lease.release()

    names = [n for n in "abc" for _ in range(10)]
    random.Random(7).shuffle(names)  # noqa: S311 (an order, not a secret)
    await asyncio.wait_for(asyncio.gather(*(request(n) for n in names)), 10)
    assert max(loaded_at_once) == 1 and len(loaded_at_once) == 30
    await pool.shutdown()


# ---------------------------------------------------------------------- the settings


def test_no_on_demand_setting_keeps_every_model_loaded() -> None:
    assert not load_settings({"model": "a,b"}, env={}).on_demand


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"max_loaded": 0}, "max_loaded must be at least 1"),
        ({"idle_unload_s": 0}, "idle_unload_s must be positive"),
        ({"load_timeout_s": -1}, "load_timeout_s must be positive"),
        ({"keep_loaded": "c"}, "keep_loaded names c, not served here"),
        ({"keep_loaded": "a,b", "max_loaded": 1}, "pins 2 models but max_loaded is 1"),
    ],
)
def test_on_demand_settings_are_checked(values: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load_settings({"model": "a,b", **values}, env={})


def test_each_setting_turns_models_on_demand_on() -> None:
    env = {"INFERD_MODEL": "a,b", "INFERD_KEEP_LOADED": "a"}
    s = load_settings({}, env=env)
    assert s.on_demand and s.pinned == ["a"] and s.max_loaded is None
    assert load_settings({"model": "a,b", "max_loaded": 1}, env={}).on_demand
    assert load_settings({"model": "a,b", "idle_unload_s": 60}, env={}).on_demand


def test_the_fit_check_is_the_several_model_memory_estimate(tmp_path: Path) -> None:
    hosts = FIXTURES / "hardware" / "cpu-epyc-2core"
    models = "smollm2-135m-instruct,all-minilm-l6-v2"
    settings = load_settings(
        {"model": models, "hardware": str(hosts), "cache_path": str(tmp_path)}, env={}
    )
    # The two on a host with 5 GiB: each fits alone (2.8 and 2.3 GiB), not both.
    small = [
        replace(p, chosen=replace(p.chosen, estimate=replace(p.chosen.estimate, available=5 * GiB)))
        for p in resolve_all(settings)
        if p.chosen.estimate
    ]
    why_not = fit_check(small)
    assert why_not(["smollm2-135m-instruct"]) is None
    assert "do not fit in host memory together" in (why_not(models.split(",")) or "")
