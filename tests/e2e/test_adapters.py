"""LoRA adapters through a real `inferd serve` on both engines (issue 17): a real adapter, trained
here on the default model (tests/adapters/train_lora.py), served from `--lora-path` beside two
that must be refused (made for another base model, and a truncated weights file).

Shown on llama.cpp (the adapter converted to GGUF by llama.cpp's own converter, applied per
request) and on vLLM (loaded through its LoRA support), with the official SDKs: the listing
(`parent`), the adapter's effect on held-out prompts (its task score far above the base
model's) through chat, completions, Responses and Messages, base and adapter requests at once
without mixing, an adapter added and another removed while requests run (the one left keeps its
own weights; llama-server is restarted without the removed one), and the refusals, while the
service goes on serving; with models on demand, an adapter loads and reloads with its model.
One server per engine for the module (vLLM starts slowly), and one with both engines behind the
model (`cpu-both`), where every engine holds each adapter in its own format and a crowd of
adapter requests is answered by both.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import psutil
import pytest

from inferd.server.admission import RETURN_S
from tests.adapters import train_lora
from tests.e2e.conftest import (
    BOTH_PROFILE,
    EAGER,
    INFERD,
    LLAMACPP_PROFILE,
    MODEL,
    VLLM_PROFILE,
    Served,
    cache_path,
    cache_with_crowd_figures,
)
from tests.e2e.conftest import serving as serving_inferd

pytestmark = pytest.mark.e2e
ADAPTER = train_lora.ADAPTER_NAME
PROMPTS = train_lora.held_out(12)


def base_folder() -> Path:
    """The default model as a Hugging Face folder (the vLLM profile's), which the adapter is
    trained on: pulled into the test cache if it is not there yet."""
    env = {**os.environ, "INFERD_CACHE_PATH": str(cache_path())}
    subprocess.run(
        [INFERD, "cache", "pull", MODEL, "--profile", VLLM_PROFILE],
        env=env,
        check=True,
        capture_output=True,
        timeout=900,
    )
    return cache_path() / "models" / MODEL / "safetensors-bf16"


@pytest.fixture(scope="module")
def adapter() -> Path:
    return train_lora.cached_adapter(base_folder())


@pytest.fixture(scope="module")
def lora_dir(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapters")
    shutil.copytree(adapter, folder / ADAPTER)
    wrong = shutil.copytree(adapter, folder / "wrong-base")
    config = json.loads((wrong / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B-Instruct"
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    broken = shutil.copytree(adapter, folder / "broken")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


@pytest.fixture(
    scope="module",
    params=[LLAMACPP_PROFILE, VLLM_PROFILE, BOTH_PROFILE],
    ids=["llamacpp", "vllm", "both"],
)
def served(
    request: pytest.FixtureRequest, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    args = (
        *("--profile", request.param, "--lora-path", str(lora_dir), "--lora-refresh-s", "1"),
        *("--queue-timeout-s", "300"),  # on a loaded CI machine: wait, never 503
        EAGER,
    )
    root = tmp_path_factory.mktemp("serve")
    # Both engines: speed figures under which a crowd goes to vLLM too, on any CPU.
    cache = cache_with_crowd_figures(root) if request.param == BOTH_PROFILE else None
    with serving_inferd(root, *args, cache=cache) as server:
        server.wait_all_engines()
        yield server


@pytest.fixture(scope="module")
def oai(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(oai: openai.OpenAI, model: str, prompt: str) -> str:
    done = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=24,
        temperature=0,
    )
    return done.choices[0].message.content or ""


def score(oai: openai.OpenAI, model: str) -> float:
    replies = [chat(oai, model, prompt) for prompt, _ in PROMPTS]
    return train_lora.score(replies, [label for _, label in PROMPTS])


def test_an_adapter_loads_with_its_model_on_demand(lora_dir: Path, tmp_path: Path) -> None:
    """Models on demand with adapters (llama.cpp): the adapter is listed while its base model is
    unloaded, in its base model's state; its first request loads the base model with it; once
    another model's request has evicted the base model (`--max-loaded 1`), the adapter's next
    request loads it again, adapter and all, and base requests on it stay plain."""
    other = "qwen2.5-coder-0.5b-instruct"
    args = (
        *(MODEL, other, "--max-loaded", "1", "--lora-path", str(lora_dir)),
        *("--profile", f"{MODEL}={LLAMACPP_PROFILE},{other}=llamacpp-cpu-q4_k_m"),
        *("--load-timeout-s", "300"),
    )

    def states() -> dict[str, str | None]:
        data = httpx.get(service.url + "/v1/models", timeout=10).json()["data"]
        return {m["id"]: m.get("state") for m in data}

    with serving_inferd(tmp_path, *args) as service:
        client = openai.OpenAI(
            base_url=service.url + "/v1", api_key="-", max_retries=0, timeout=400
        )
        listed = states()
        assert listed[ADAPTER] == listed[MODEL] == "unloaded", listed
        (p1, label1), (p2, label2) = PROMPTS[1], PROMPTS[2]
        assert train_lora.parse_label(chat(client, ADAPTER, p1)) == label1
        assert states()[ADAPTER] == states()[MODEL] == "loaded"
        assert chat(client, other, "Say hello.")
        assert (states()[MODEL], states()[other]) == ("unloaded", "loaded")
        assert train_lora.parse_label(chat(client, ADAPTER, p2)) == label2
        assert train_lora.parse_label(chat(client, MODEL, p2)) is None
        assert states()[MODEL] == "loaded"


def test_adapters_are_listed_and_the_wrong_ones_refused(served: Served, oai: openai.OpenAI) -> None:
    listed = {m.id: m for m in oai.models.list().data}
    assert set(listed) == {MODEL, ADAPTER}
    extra = listed[ADAPTER].model_extra or {}
    assert (extra["parent"], extra["root"]) == (MODEL, MODEL)
    assert oai.models.retrieve(ADAPTER).id == ADAPTER
    meta = httpx.get(served.url + "/v1/metadata").json()["adapters"]
    assert [a["id"] for a in meta["served"]] == [ADAPTER]
    refused = {r["id"]: r["reason"] for r in meta["refused"]}
    assert "trained for meta-llama/Llama-3.1-8B-Instruct" in refused["wrong-base"]
    assert "truncated or altered" in refused["broken"]
    for name in ("wrong-base", "broken"):
        with pytest.raises(openai.NotFoundError) as caught:
            chat(oai, name, "Hello")
        assert caught.value.code == "model_not_found"
    assert httpx.get(served.url + "/v1/health/ready").status_code == 200


def test_the_adapter_shows_its_effect_on_held_out_prompts(oai: openai.OpenAI) -> None:
    with_adapter, base = score(oai, ADAPTER), score(oai, MODEL)
    print(f"task score on {len(PROMPTS)} held-out prompts: adapter {with_adapter}, base {base}")
    # Measured here: 0.75 against 0.0 (llama.cpp Q8_0). The base model never answers in the
    # format; the adapter does every time and mostly picks the right label.
    assert with_adapter >= 0.6, with_adapter
    assert base <= 0.1, base


def test_every_api_serves_the_adapter(served: Served, oai: openai.OpenAI) -> None:
    prompt, label = PROMPTS[0]
    template = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        f"Face<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )
    completion = oai.completions.create(
        model=ADAPTER, prompt=template, max_tokens=24, temperature=0, stop=["<|im_end|>"]
    )
    assert train_lora.parse_label(completion.choices[0].text) == label
    assert completion.model in (ADAPTER, MODEL)
    response = oai.responses.create(
        model=ADAPTER, input=prompt, max_output_tokens=24, temperature=0
    )
    assert response.model == ADAPTER
    assert train_lora.parse_label(response.output_text) == label
    claude = anthropic.Anthropic(base_url=served.url, api_key="unused", max_retries=0)
    message = claude.messages.create(
        model=ADAPTER,
        max_tokens=24,
        messages=[{"role": "user", "content": prompt}],
        extra_body={"temperature": 0},
    )
    assert message.model == ADAPTER
    text = "".join(b.text for b in message.content if b.type == "text")
    assert train_lora.parse_label(text) == label
    stream = oai.chat.completions.create(
        model=ADAPTER,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert train_lora.parse_label(streamed) == label


def test_base_and_adapter_requests_at_once_do_not_mix(oai: openai.OpenAI) -> None:
    # 8 at once: llama.cpp's 4 slots and 4 queued.
    jobs = [(model, p, lab) for p, lab in PROMPTS[:4] for model in (ADAPTER, MODEL)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: chat(oai, job[0], job[1]), jobs))
    # Mixed up, an adapter request would answer in prose or a base one in the adapter's format.
    # Which label it picks is the effect's business (above), not this test's.
    adapter_format = base_format = 0
    for (model, _, _), reply in zip(jobs, replies, strict=True):
        labelled = train_lora.parse_label(reply) in train_lora.TOPICS
        if model == ADAPTER:
            adapter_format += labelled
        else:
            base_format += labelled
    assert adapter_format == len(jobs) // 2, replies
    assert base_format == 0, replies


def _engine_requests(served: Served) -> dict[str, float]:
    """Requests each engine of the model has taken (`inferd_engine_requests_total`)."""
    metrics = httpx.get(served.url + "/metrics", timeout=10).text
    found = re.findall(
        r'inferd_engine_requests_total\{engine="(\w+)",model="[^"]+"\} (\S+)', metrics
    )
    return {engine: float(count) for engine, count in found}


def test_a_crowd_of_adapter_requests_is_answered_by_each_engine(
    served: Served, oai: openai.OpenAI
) -> None:
    """With both engines behind the model, one user on llama.cpp and a crowd arriving while it
    streams on vLLM: each holds the adapter (llama.cpp as GGUF, vLLM as PEFT) and every answer
    is in the adapter's format."""
    if served.profile != BOTH_PROFILE:
        pytest.skip("one engine: the tests above show it")
    # The test before ended a crowd's requests a moment ago: within RETURN_S a request counts
    # as one of their clients' next (admission), so one user is alone only after it.
    time.sleep(RETURN_S + 0.25)
    before = _engine_requests(served)
    # One user alone: llama.cpp. Once its stream has begun it stays there (a crowd arriving
    # before its first token would take it back for vLLM).
    first = oai.chat.completions.create(
        model=ADAPTER,
        messages=[{"role": "user", "content": PROMPTS[0][0]}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    events = iter(first)
    text = next(e.choices[0].delta.content or "" for e in events if e.choices)
    jobs = [PROMPTS[i % len(PROMPTS)][0] for i in range(1, 16)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda prompt: chat(oai, ADAPTER, prompt), jobs))
    replies.append(text + "".join(e.choices[0].delta.content or "" for e in events if e.choices))
    assert all(train_lora.parse_label(r) in train_lora.TOPICS for r in replies), replies
    after = _engine_requests(served)
    gained = {engine: after[engine] - before.get(engine, 0) for engine in after}
    assert gained.get("llamacpp", 0) >= 1 and gained.get("vllm", 0) >= 1, gained


def _zeroed(adapter: Path, out: Path) -> Path:
    """A copy of `adapter` whose LoRA B matrices are zero: a valid adapter with no effect, so
    its answers are the base model's (never the task's JSON labels)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in tensors.items()}, weights)
    return out


def _listed(oai: openai.OpenAI) -> set[str]:
    return {m.id for m in oai.models.list().data}


def _loaded_on_llama_server(served: Served) -> str:
    """The `--lora-scaled` files of the running llama-server (empty on vLLM)."""
    lines = []
    for p in served.descendants():
        with contextlib.suppress(psutil.Error):  # one may end while looked at (a restart)
            if p.name() == "llama-server":
                lines.append(" ".join(p.cmdline()))
    return " ".join(lines)


def test_refresh_adds_and_removes_adapters_while_requests_run(
    lora_dir: Path, served: Served, oai: openai.OpenAI, tmp_path: Path
) -> None:
    """An adapter added while requests run is served; the first of two removed while the other
    is asked: the other keeps its own weights (llama-server names adapters by their place in its
    list, so a removal must not shift them) and, on llama.cpp, the removed one is unloaded."""
    second = "topic-labels-zeroed"
    stop = time.monotonic() + 600
    outcomes: list[str] = []
    asking = [ADAPTER]

    def keep_asking() -> None:
        prompt, label = PROMPTS[1]
        while time.monotonic() < stop:
            model = asking[0]
            reply = chat(oai, model, prompt)
            got = train_lora.parse_label(reply)
            ok = got == label if model == ADAPTER else got is None
            outcomes.append("ok" if ok else f"{model}: {reply}")
            chat(oai, MODEL, prompt)

    parked = tmp_path / "parked"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(keep_asking) for _ in range(2)]
        try:
            # Made beside the folder and moved in whole, as a user should: a copy made in place
            # is read while half written (served with the copied weights, then changed).
            shutil.move(_zeroed(lora_dir / ADAPTER, tmp_path / second), lora_dir / second)
            _wait_for(lambda: second in _listed(oai))
            prompt, _ = PROMPTS[2]
            assert train_lora.parse_label(chat(oai, second, prompt)) is None
            asking[0] = second
            shutil.move(lora_dir / ADAPTER, parked)
            _wait_for(lambda: ADAPTER not in _listed(oai))
            with pytest.raises(openai.NotFoundError):
                chat(oai, ADAPTER, prompt)
            time.sleep(3)  # the remaining adapter asked again after the change
        finally:
            stop = time.monotonic()
            for future in running:
                future.result()  # no request failed while the set changed
    assert outcomes and all(o == "ok" for o in outcomes), outcomes
    if LLAMACPP_PROFILE in served.log.read_text():
        # The cache keeps each adapter as NAME-DIGEST/adapter.gguf. The removed one goes with
        # llama-server's restart (with both engines, after vLLM has unloaded it).
        def only_the_second() -> bool:
            loaded = _loaded_on_llama_server(served)
            return bool(re.search(rf"/{second}-[0-9a-f]{{16}}/", loaded)) and not re.search(
                rf"/{ADAPTER}-[0-9a-f]{{16}}/", loaded
            )

        _wait_for(only_the_second, timeout=60)
    # The module's other tests (on the next engine) need the folder as it was.
    shutil.move(parked, lora_dir / ADAPTER)
    shutil.rmtree(lora_dir / second)
    _wait_for(lambda: ADAPTER in _listed(oai) and second not in _listed(oai))


def _wait_for(condition: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # llama.cpp: the listing is 503 + Retry-After for the second its engine restarts.
        with contextlib.suppress(openai.InternalServerError):
            if condition():  # type: ignore[operator]
                return
        time.sleep(0.5)
    raise AssertionError("the adapter folder's change was not seen in time")
