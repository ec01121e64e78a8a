"""The model-server protocol's metrics: what Kubernetes' inference gateway reads to route.

The Gateway API Inference Extension's endpoint picker (docs/proposals/003-model-server-protocol in
kubernetes-sigs/gateway-api-inference-extension) scrapes every pod of an `InferencePool` and
routes each request by queue depth, KV-cache use, prefix affinity and loaded LoRA adapters. It
reads vLLM's metric names by default; inferd exports them under those names for every engine, per
served model (label `model_name`, as vLLM labels them), with the protocol's meanings:

name (the picker's default)  type   unit      meaning                           NIM's name beside
---------------------------  -----  --------  --------------------------------  -----------------
vllm:num_requests_waiting    gauge  requests  accepted, not yet processed:      num_requests_waiting
                                              inferd's admission queue + the    (inferd's queue)
                                              engine's (vLLM's waiting,
                                              llama-server's deferred)
vllm:num_requests_running    gauge  requests  being processed by the engine     num_requests_running
                                              (vLLM's batch, llama-server's     (let through to the
                                              busy slots)                       engine by inferd)
vllm:kv_cache_usage_perc     gauge  fraction  KV cache held by requests in      gpu_cache_usage_perc
                                    0 to 1    progress (1 = full; the
                                              protocol's "percentage" is this
                                              fraction, as vLLM reports it)
vllm:lora_requests_info      gauge  Unix s    labels running_lora_adapters,     none
                                              waiting_lora_adapters (comma-
                                              separated names), max_lora
vllm:cache_config_info       gauge  1         labels block_size (tokens per     none
                                              KV block), num_gpu_blocks

Per engine: vLLM reports all five; inferd adds its own queue to vLLM's waiting. llama-server:
waiting = inferd's queue + `llamacpp:requests_deferred`, running = `llamacpp:requests_processing`,
KV use = `llamacpp:kv_cache_usage_ratio` where the build has it, else from `/slots` (the busy
slots' cached tokens over the context of all slots; an idle slot's kept prompt is reusable, like
vLLM's cached blocks, so it does not count); no `cache_config_info` (its cache is not paged: the
picker then uses its prefix plugin's block size). LoRA: vLLM's own gauge where it has one (it
sees which adapters its batches use and which wait); else the adapters the engine loaded at its
start, all ready (`ModelLoad.running_adapters`, none waiting), and `max_lora` the service's limit
of adapters per batch; empty lists and `max_lora="0"` while no adapter is served.

With both engines behind a model, a request taken back from llama.cpp at a change of turn
(`server.admission`) waits again in inferd's queue while llama-server may still count it as
processing until it has dropped it (after the batch at hand, a fraction of a second): counted
twice that long, never missed.

vLLM exports these names itself, but its queue is only the engine's: inferd takes the engine's
families out of the pass-through (`scrape`) and writes them again with its own queue
added, so each family appears once in `/v1/metrics` (a family written twice breaks the picker's
parser). `server.management` calls `scrape` per ready engine and `render` once per scrape; the
engine-specific reading is one function per engine in `READERS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
LORA_INFO = "vllm:lora_requests_info"
CACHE_INFO = "vllm:cache_config_info"
PROTOCOL = (WAITING, RUNNING, KV_USAGE, LORA_INFO, CACHE_INFO)
# vLLM before 0.10 called the KV-cache gauge this; read it when the new name is absent.
OLD_KV_USAGE = "vllm:gpu_cache_usage_perc"

HELP = {
    WAITING: "Requests accepted and not yet processed (inferd's queue and the engine's).",
    RUNNING: "Requests the engine is processing.",
    KV_USAGE: "Fraction of the KV cache held by requests in progress (1 = full).",
    LORA_INFO: "LoRA adapters running and waiting; the value is the time of the last update.",
    CACHE_INFO: "The engine's KV-cache layout (block size in tokens, number of blocks).",
}
# llama-server's gauges (`--metrics`): busy slots, and requests waiting for a free slot.
LLAMACPP_PROCESSING = "llamacpp:requests_processing"
LLAMACPP_DEFERRED = "llamacpp:requests_deferred"
LLAMACPP_KV_RATIO = "llamacpp:kv_cache_usage_ratio"  # newer llama-server builds only

Labels = dict[str, str]
Samples = dict[str, list[tuple[Labels, float]]]


@dataclass(frozen=True)
class EngineLoad:
    """What one engine reports of its load, read from its own metrics (and llama-server's slots)."""

    waiting: float = 0.0  # requests queued inside the engine
    running: float = 0.0
    kv_usage: float | None = None
    lora: Labels | None = None  # the engine's own LoRA info series, where it has one
    cache_info: Labels | None = None


def together(loads: Sequence[EngineLoad]) -> EngineLoad:
    """The load of a model served by several engines (a combined profile), as one: requests
    queued and running add up, the KV cache is as full as the fullest, the first engine's
    LoRA and cache series stand for the model."""
    if len(loads) == 1:
        return loads[0]
    kv = [x.kv_usage for x in loads if x.kv_usage is not None]
    return EngineLoad(
        waiting=sum(x.waiting for x in loads),
        running=sum(x.running for x in loads),
        kv_usage=max(kv) if kv else None,
        lora=next((x.lora for x in loads if x.lora is not None), None),
        cache_info=next((x.cache_info for x in loads if x.cache_info is not None), None),
    )


@dataclass(frozen=True)
class ModelLoad:
    """One served model's protocol series: the engine's load plus what inferd holds for it."""

    model: str
    held: int  # requests in inferd's admission queue
    engine: EngineLoad
    # Adapters loaded and waiting for this model: the adapters feature fills these in.
    running_adapters: Sequence[str] = ()
    waiting_adapters: Sequence[str] = ()
    max_adapters: int = 0
    updated: float = field(default_factory=time.time)


def metric_name(line: str) -> str:
    """The family a line of Prometheus text belongs to (`# HELP name ...`, `name{...} v`)."""
    if line.startswith("#"):
        parts = line.split(" ", 3)
        return parts[2] if len(parts) > 2 and parts[1] in ("HELP", "TYPE") else ""
    end = len(line)
    for stop in ("{", " "):
        at = line.find(stop)
        if at != -1:
            end = min(end, at)
    return line[:end]


def split(exposition: bytes, wanted: frozenset[str]) -> tuple[bytes, Samples]:
    """The exposition without the protocol's families, and the samples of `wanted` families
    (parsed from their lines only: an engine's whole exposition is too long to parse 20 times a
    second, the picker's default poll)."""
    kept: list[str] = []
    picked: list[str] = []
    for line in exposition.decode("utf-8", "replace").splitlines():
        name = metric_name(line)
        if name in wanted:
            picked.append(line)
        if name not in PROTOCOL:
            kept.append(line)
    samples: Samples = {}
    with contextlib.suppress(ValueError):  # an engine's malformed line: that engine reads 0
        for family in text_string_to_metric_families("\n".join(picked) + "\n"):
            for s in family.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    body = "\n".join(kept)
    return (body + "\n").encode() if body else b"", samples


def _first(samples: Samples, name: str) -> float | None:
    found = samples.get(name)
    return found[0][1] if found else None


def _total(samples: Samples, name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


def read_vllm(samples: Samples, slots: Any) -> EngineLoad:
    kv = _first(samples, KV_USAGE)
    lora = samples.get(LORA_INFO)
    cache = samples.get(CACHE_INFO)
    return EngineLoad(
        waiting=_total(samples, WAITING),
        running=_total(samples, RUNNING),
        kv_usage=kv if kv is not None else _first(samples, OLD_KV_USAGE),
        # The newest series (highest timestamp value), as the picker reads it.
        lora=max(lora, key=lambda s: s[1])[0] if lora else None,
        cache_info=cache[0][0] if cache else None,
    )


def slots_kv_usage(slots: Any) -> float | None:
    """llama-server's `/slots`: each slot holds its own part of the context (`n_ctx`); a busy
    slot's cache holds `n_prompt_tokens` (prompt and generated tokens alike). An idle slot keeps
    its last prompt for reuse, which frees like vLLM's cached blocks: not counted as used."""
    if not isinstance(slots, list) or not slots:
        return None
    total = used = 0
    for slot in slots:
        if not isinstance(slot, dict):
            return None
        total += int(slot.get("n_ctx") or 0)
        if slot.get("is_processing"):
            used += int(slot.get("n_prompt_tokens") or 0)
    return min(1.0, used / total) if total else None


def read_llamacpp(samples: Samples, slots: Any) -> EngineLoad:
    kv = _first(samples, LLAMACPP_KV_RATIO)
    return EngineLoad(
        waiting=_total(samples, LLAMACPP_DEFERRED),
        running=_total(samples, LLAMACPP_PROCESSING),
        kv_usage=kv if kv is not None else slots_kv_usage(slots),
    )


@dataclass(frozen=True)
class Reader:
    """How to read one engine's load: the families it needs, a route of slot state to fetch
    besides its metrics (or none), and the function that turns both into an `EngineLoad`."""

    families: frozenset[str]
    read: Callable[[Samples, Any], EngineLoad]
    slots_path: str | None = None


READERS: dict[str, Reader] = {
    "vllm": Reader(frozenset({*PROTOCOL, OLD_KV_USAGE}), read_vllm),
    "llamacpp": Reader(
        frozenset({LLAMACPP_PROCESSING, LLAMACPP_DEFERRED, LLAMACPP_KV_RATIO}),
        read_llamacpp,
        slots_path="/slots",
    ),
}


Fetch = Callable[[str], Awaitable[tuple[int, bytes] | None]]


async def scrape(fetch: Fetch, engine: str, metrics_path: str) -> tuple[bytes, EngineLoad | None]:
    """One engine's own metrics for the pass-through (the protocol's families taken out) and its
    load; (b"", None) when the engine does not answer, (its metrics, None) for an engine not in
    `READERS`. `fetch` GETs a path of the engine (the
    supervisor's, with the engine's key and a short time limit)."""
    reader = READERS.get(engine)
    paths = [metrics_path] + ([reader.slots_path] if reader and reader.slots_path else [])
    answers = await asyncio.gather(*(fetch(p) for p in paths))
    if answers[0] is None or answers[0][0] != 200:
        return b"", None
    if reader is None:  # an engine this module cannot read: its metrics as they are
        return answers[0][1], None
    body, samples = split(answers[0][1], reader.families)
    slots: Any = None
    if len(answers) > 1 and answers[1] is not None and answers[1][0] == 200:
        with contextlib.suppress(ValueError):
            slots = json.loads(answers[1][1])
    return body, reader.read(samples, slots)


def _labels(pairs: Mapping[str, str]) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in pairs.items()) + "}"


def _family(name: str, rows: Sequence[tuple[Mapping[str, str], float]]) -> list[str]:
    if not rows:
        return []
    lines = [f"# HELP {name} {HELP[name]}", f"# TYPE {name} gauge"]
    return lines + [f"{name}{_labels(labels)} {value!r}" for labels, value in rows]


def render(loads: Sequence[ModelLoad]) -> bytes:
    """The protocol's families, one block each, a series per model (the picker reads the first
    series of a family: list the model to route by first)."""
    waiting, running, kv, lora, cache = [], [], [], [], []
    for m in loads:
        model = {"model_name": m.model}
        waiting.append((model, float(m.held) + m.engine.waiting))
        running.append((model, m.engine.running))
        if m.engine.kv_usage is not None:
            kv.append((model, m.engine.kv_usage))
        if m.engine.lora is not None:  # the engine's own (vLLM's), which sees its batches
            lora.append(({**m.engine.lora, **model}, m.updated))
        else:
            lora.append(
                (
                    {
                        **model,
                        "max_lora": str(m.max_adapters),
                        "running_lora_adapters": ",".join(m.running_adapters),
                        "waiting_lora_adapters": ",".join(m.waiting_adapters),
                    },
                    m.updated,
                )
            )
        if m.engine.cache_info is not None:
            cache.append(({**m.engine.cache_info, **model}, 1.0))
    lines = [
        *_family(WAITING, waiting),
        *_family(RUNNING, running),
        *_family(KV_USAGE, kv),
        *_family(LORA_INFO, lora),
        *_family(CACHE_INFO, cache),
    ]
    return ("\n".join(lines) + "\n").encode() if lines else b""
