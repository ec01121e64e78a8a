"""The model-server protocol's families: taken out of an engine's exposition and written again
once, with inferd's queue added (`observability.gateway_metrics`). vLLM's input is a real scrape
of vLLM 0.32.0 (tests/fixtures/vllm-0.32.0/metrics.txt); the live engines: tests/e2e."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from inferd.observability import gateway_metrics as gm

VLLM_SCRAPE = (Path(__file__).parents[1] / "fixtures" / "vllm-0.32.0" / "metrics.txt").read_bytes()
LLAMACPP_SCRAPE = b"""\
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
"""


def _slot(n_ctx: int, busy: bool, tokens: int | None) -> dict[str, object]:
    slot: dict[str, object] = {"id": 0, "n_ctx": n_ctx, "is_processing": busy}
    if tokens is not None:
        slot["n_prompt_tokens"] = tokens
    return slot


def _families(text: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {
        f.name: [(dict(s.labels), s.value) for s in f.samples]
        for f in text_string_to_metric_families(text.decode())
    }


def _fetcher(answers: dict[str, bytes]) -> gm.Fetch:
    async def fetch(path: str) -> tuple[int, bytes] | None:
        return (200, answers[path]) if path in answers else None

    return fetch


def test_vllm_passes_through_with_inferds_queue_added() -> None:
    body, load = asyncio.run(gm.scrape(_fetcher({"/metrics": VLLM_SCRAPE}), "vllm", "/metrics"))
    assert load is not None and load.cache_info is not None
    out = body + gm.render([gm.ModelLoad("m", held=3, engine=load)])
    typed = Counter(ln.split(" ")[2] for ln in out.decode().splitlines() if ln.startswith("# TYPE"))
    assert max(typed.values()) == 1  # each family once: the picker's parser refuses repeats
    families = _families(out)
    assert families[gm.WAITING] == [({"model_name": "m"}, 3.0)]  # the engine's 0 + inferd's 3
    assert families[gm.KV_USAGE] == [({"model_name": "m"}, 0.0)]
    [(cache, _)] = families[gm.CACHE_INFO]
    assert cache["block_size"] == "128" and cache["num_gpu_blocks"] == "728"
    # The rest of vLLM's exposition is untouched.
    assert families["vllm:num_requests_waiting_by_reason"]
    assert len(families) == len(_families(VLLM_SCRAPE)) + 1  # + the LoRA gauge vLLM lacks here


def test_llamacpp_load_from_its_metrics_and_slots() -> None:
    slots = [_slot(2048, True, 1024), _slot(2048, True, 512), _slot(2048, False, 2000)]
    fetch = _fetcher({"/metrics": LLAMACPP_SCRAPE, "/slots": json.dumps(slots).encode()})
    body, load = asyncio.run(gm.scrape(fetch, "llamacpp", "/metrics"))
    assert body == LLAMACPP_SCRAPE  # nothing of the protocol's to take out
    # Busy slots' tokens over every slot's context; the idle slot's kept prompt is free.
    assert load == gm.EngineLoad(waiting=1, running=2, kv_usage=(1024 + 512) / 6144)
    families = _families(gm.render([gm.ModelLoad("m", held=2, engine=load)]))
    assert families[gm.WAITING] == [({"model_name": "m"}, 3.0)]
    assert families[gm.RUNNING] == [({"model_name": "m"}, 2.0)]
    assert gm.CACHE_INFO not in families  # not a paged cache
    [(lora, _)] = families[gm.LORA_INFO]
    assert lora == {"model_name": "m", "max_lora": "0", "running_lora_adapters": "",
                    "waiting_lora_adapters": ""}  # fmt: skip


def test_an_engine_that_does_not_answer_adds_nothing() -> None:
    assert asyncio.run(gm.scrape(_fetcher({}), "llamacpp", "/metrics")) == (b"", None)
    # /slots unreadable: the load still counts, without a KV figure.
    fetch = _fetcher({"/metrics": LLAMACPP_SCRAPE, "/slots": b"not json"})
    _, load = asyncio.run(gm.scrape(fetch, "llamacpp", "/metrics"))
    assert load == gm.EngineLoad(waiting=1, running=2, kv_usage=None)
    assert gm.render([]) == b""


def test_adapters_fill_the_lora_gauge_for_every_model() -> None:
    loads = [
        gm.ModelLoad("a", 0, gm.EngineLoad(), running_adapters=("x", "y"), max_adapters=4),
        gm.ModelLoad("b", 0, gm.EngineLoad()),
    ]
    lora = _families(gm.render(loads))[gm.LORA_INFO]
    assert [labels["running_lora_adapters"] for labels, _ in lora] == ["x,y", ""]
    assert lora[0][0]["max_lora"] == "4"
    # vLLM's own gauge, which sees its batches, wins over the adapters loaded at its start.
    own = {"max_lora": "2", "running_lora_adapters": "x", "waiting_lora_adapters": "y"}
    vllm = gm.ModelLoad("a", 0, gm.EngineLoad(lora=own), running_adapters=("x", "y"))
    [(labels, _)] = _families(gm.render([vllm]))[gm.LORA_INFO]
    assert labels == {**own, "model_name": "a"}
