"""Chat, embeddings and ranking from one endpoint: `inferd serve CHAT EMBEDDER RERANKER`.

The chat model runs on llama.cpp, all-MiniLM-L6-v2 and the ms-marco cross-encoder on vLLM's
pooling runner, side by side in one service, all real. The vectors are checked against
sentence-transformers' own encoding of the same cached files, the reranker's logits against
onnxruntime running the ONNX file it shipped as, NIM's request formats are sent unchanged, and
LangChain's OpenAIEmbeddings embeds documents through it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from inferd.catalog import Catalog
from tests.e2e.conftest import EAGER, LLAMACPP_PROFILE, MODEL, Served, cache_path, serving

EMBEDDER = "all-minilm-l6-v2"
RERANKER = "ms-marco-minilm-l-12-v2"
ALL = {MODEL, EMBEDDER, RERANKER}
SENTENCES = [
    "The cat sits on the mat.",
    "A feline is resting on a rug.",
    "Stock markets fell sharply on Monday.",
    "How do I reset my password?",
    "Photosynthesis turns light into chemical energy in plants.",
    "Le chat dort sur le canapé.",
]
QUERY = "How do plants make energy from sunlight?"
PASSAGES = [
    "The stock exchange closed lower after a volatile session.",
    "Photosynthesis lets plants convert sunlight, water and carbon dioxide into sugar.",
    "Cats sleep for up to sixteen hours a day.",
]


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(
        tmp_path_factory.mktemp("retrieval"),
        *(MODEL, EMBEDDER, RERANKER),
        *("--profile", f"{MODEL}={LLAMACPP_PROFILE}"),
        EAGER,
    ) as served:
        yield served


@pytest.fixture(scope="module")
def client(both: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=both.url + "/v1", api_key="unused", max_retries=0)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    cosines: np.ndarray = np.sum(a * b, axis=-1)
    return cosines


def test_one_endpoint_lists_both_models_with_their_readiness(both: Served) -> None:
    ids = {m["id"] for m in httpx.get(both.url + "/v1/models").json()["data"]}
    assert ids == ALL
    ready = httpx.get(both.url + "/v1/health/ready")
    assert ready.status_code == 200
    models = ready.json()["models"]
    assert set(models) == ALL
    assert {m["state"] for m in models.values()} == {"ready"}
    # While starting, readiness named each model and was 503 until both were ready.
    starting = [json.loads(t) for p, code, t in both.seen if p.endswith("ready") and code == 503]
    assert starting and all(set(s["models"]) == ALL for s in starting)


def test_vectors_equal_sentence_transformers_own_encoding(client: openai.OpenAI) -> None:
    st = pytest.importorskip("sentence_transformers")
    folder = cache_path() / "models" / EMBEDDER / "safetensors-fp32"
    reference = st.SentenceTransformer(str(folder), device="cpu").encode(SENTENCES)
    answer = client.embeddings.create(model=EMBEDDER, input=SENTENCES)
    served = np.array([d.embedding for d in sorted(answer.data, key=lambda d: d.index)])
    assert served.shape == (len(SENTENCES), 384)
    cosines = _cosine(served, np.asarray(reference))
    assert cosines.min() >= 0.999, cosines
    assert answer.usage.prompt_tokens > len(SENTENCES)  # counted by the engine's tokenizer


def test_base64_is_the_same_vector(client: openai.OpenAI, both: Served) -> None:
    floats = client.embeddings.create(model=EMBEDDER, input="hello world").data[0].embedding
    raw = httpx.post(
        both.url + "/v1/embeddings",
        json={"model": EMBEDDER, "input": "hello world", "encoding_format": "base64"},
    ).json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(raw), dtype=np.float32)
    assert np.allclose(decoded, floats, atol=1e-6)


def test_nim_extras(both: Served) -> None:
    def embed(**extra: object) -> httpx.Response:
        body = {"model": EMBEDDER, "input": ["a question about cats"], **extra}
        return httpx.post(both.url + "/v1/embeddings", json=body, timeout=60)

    plain = embed().json()["data"][0]["embedding"]
    # A symmetric model: queries and passages are embedded alike.
    for kind in ("query", "passage"):
        r = embed(input_type=kind)
        assert r.status_code == 200 and np.allclose(r.json()["data"][0]["embedding"], plain)
    assert embed(dimensions=384).status_code == 200
    r = embed(dimensions=128)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "dimensions"
    assert "not trained to be shortened" in r.json()["error"]["message"]
    assert embed(input_type="document").json()["error"]["param"] == "input_type"


def test_truncate_none_refuses_with_the_count_and_start_end_cut_each_side(both: Served) -> None:
    # About 200 tokens on each subject, 400 in all: more than the model's 256.
    head = (
        "Cats purr when they are content and knead soft blankets with their paws. "
        "A kitten sleeps most of the day and chases string in the evening. "
    ) * 6
    tail = (
        "Share prices fell sharply as investors sold bank stocks on Monday. "
        "The central bank's interest rate decision unsettled the bond market. "
    ) * 6

    def embed(text: str, truncate: str | None = None) -> np.ndarray:
        body = {"model": EMBEDDER, "input": text, **({"truncate": truncate} if truncate else {})}
        r = httpx.post(both.url + "/v1/embeddings", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return np.array(r.json()["data"][0]["embedding"])

    refused = httpx.post(
        both.url + "/v1/embeddings",
        json={"model": EMBEDDER, "input": head + tail, "truncate": "NONE"},
        timeout=60,
    )
    assert refused.status_code == 400
    error = refused.json()["error"]
    # The input's own count (engines stop counting at the limit), and the way out.
    found = re.search(
        r"the input has (\d+) tokens and the model's context is 256", error["message"]
    )
    assert found and int(found.group(1)) > 300, error["message"]
    assert "truncate=END" in error["message"] and error["param"] == "input"
    kept_start, kept_end = embed(head + tail, "END"), embed(head + tail, "START")
    cats, stocks = embed(head), embed(tail)
    # END cuts the end (what is kept is mostly about cats), START the start (mostly stocks).
    assert _cosine(kept_start, cats) > _cosine(kept_end, cats)
    assert _cosine(kept_end, stocks) > _cosine(kept_start, stocks)


def test_nim_ranking_puts_the_relevant_passage_first(both: Served) -> None:
    body = {
        "model": EMBEDDER,
        "query": {"text": QUERY},
        "passages": [{"text": p} for p in PASSAGES],
        "truncate": "END",
    }
    r = httpx.post(both.url + "/v1/ranking", json=body, timeout=60)
    assert r.status_code == 200, r.text
    rankings = r.json()["rankings"]
    assert rankings[0]["index"] == 1
    assert sorted(x["index"] for x in rankings) == [0, 1, 2]
    logits = [x["logit"] for x in rankings]
    assert logits == sorted(logits, reverse=True)
    bad = httpx.post(both.url + "/v1/ranking", json={**body, "passages": ["plain"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "passages[0]"


def test_cohere_style_rerank(both: Served) -> None:
    body = {"model": EMBEDDER, "query": QUERY, "documents": PASSAGES, "top_n": 2}
    r = httpx.post(both.url + "/v1/rerank", json=body, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and results[0]["index"] == 1
    assert results[0]["document"]["text"] == PASSAGES[1]
    bare = httpx.post(both.url + "/v1/rerank", json={**body, "return_documents": False}).json()
    assert "document" not in bare["results"][0]


def test_each_request_goes_to_its_models_engine(client: openai.OpenAI, both: Served) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5
    )
    assert chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(
            model=EMBEDDER, messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    with pytest.raises(openai.BadRequestError, match="chat model"):
        client.embeddings.create(model=MODEL, input="hi")
    metrics = httpx.get(both.url + "/metrics").text
    for model in (MODEL, EMBEDDER):  # (the reranker's requests are counted the same way)
        # inferd's own counter (the engines' pass through as vllm:* and llamacpp:*).
        assert re.search(rf'^request_success_total\{{[^}}]*model="{model}"', metrics, re.M)


def test_metadata_says_how_the_embedder_ranks(both: Served) -> None:
    models = {m["id"]: m for m in httpx.get(both.url + "/v1/metadata").json()["models"]}
    assert models[EMBEDDER]["embedding"]["dimensions"] == 384
    assert "cosine" in models[EMBEDDER]["ranking"]["method"]
    assert "ranking" not in models[MODEL]
    assert "cross-encoder" in models[RERANKER]["ranking"]["method"]
    assert "embedding" not in models[RERANKER]


def test_langchain_openai_embeddings(both: Served) -> None:
    lc = pytest.importorskip("langchain_openai")
    # No tiktoken length check: its encodings download from the internet, and inferd counts
    # tokens with the model's own tokenizer anyway.
    embedder = lc.OpenAIEmbeddings(
        model=EMBEDDER,
        base_url=both.url + "/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
    )
    vectors = embedder.embed_documents(PASSAGES)
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
    query = embedder.embed_query(QUERY)
    scores = _cosine(np.array(vectors), np.array(query))
    assert int(np.argmax(scores)) == 1


def test_the_cross_encoder_ranks_with_the_logits_of_the_file_it_shipped_as(both: Served) -> None:
    ort = pytest.importorskip("onnxruntime")
    tokenizers = pytest.importorskip("tokenizers")
    entry = Catalog.load().get(RERANKER)
    shipped = entry.sources[0].file("weights")
    assert shipped is not None and shipped.sha256
    onnx_file = cache_path() / "blobs" / "sha256" / shipped.sha256
    folder = cache_path() / "models" / RERANKER / "safetensors-fp32"
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding()
    pairs = tok.encode_batch([(QUERY, p) for p in PASSAGES])
    feeds = {
        "input_ids": np.array([e.ids for e in pairs], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in pairs], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in pairs], dtype=np.int64),
    }
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)[0].ravel()

    body = {
        "model": RERANKER,
        "query": {"text": QUERY},
        "passages": [{"text": p} for p in PASSAGES],
    }
    r = httpx.post(both.url + "/v1/ranking", json=body, timeout=60)
    assert r.status_code == 200, r.text
    rankings = r.json()["rankings"]
    assert [x["index"] for x in rankings] == list(np.argsort(-expected))
    served = {x["index"]: x["logit"] for x in rankings}
    # Raw logits, as NIM returns them; onnxruntime also quantizes activations to 8 bits, so the
    # dequantized model differs from it by a few tenths at most.
    for index, logit in served.items():
        assert abs(logit - float(expected[index])) < 0.5, (index, logit, expected[index])
    assert rankings[0]["index"] == 1 and rankings[0]["logit"] > 0 > rankings[-1]["logit"]

    cohere = httpx.post(
        both.url + "/v1/rerank",
        json={"model": RERANKER, "query": QUERY, "documents": PASSAGES},
        timeout=60,
    ).json()["results"]
    # The Cohere/Jina format gives relevance in (0, 1): the sigmoid of the same logits.
    for result in cohere:
        assert result["relevance_score"] == pytest.approx(
            1 / (1 + np.exp(-served[result["index"]])), abs=1e-4
        )
    refused = httpx.post(both.url + "/v1/embeddings", json={"model": RERANKER, "input": "x"})
    assert refused.status_code == 400 and "reranking model" in refused.json()["error"]["message"]
