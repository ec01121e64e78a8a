"""NIM's retrieval formats in the engine's terms: embeddings extras, ranking, task routing."""

from __future__ import annotations

from typing import Any

import pytest

from inferd.catalog import Catalog
from inferd.catalog.schema import Embedding, ModelEntry
from inferd.errors import InvalidRequestError
from inferd.server import retrieval

CATALOG = Catalog.load()
MINILM = CATALOG.get("all-minilm-l6-v2")
CHAT = CATALOG.get("smollm2-135m-instruct")


def _with(entry: ModelEntry, **embedding: Any) -> ModelEntry:
    spec = Embedding(**{"dimensions": 384, **embedding})
    return entry.model_copy(update={"embedding": spec})


def test_the_catalog_describes_minilm_as_a_fixed_length_symmetric_embedder() -> None:
    assert MINILM.embedding == Embedding(dimensions=384)
    assert CHAT.embedding is None


def test_plain_openai_requests_pass_unchanged() -> None:
    payload = {"model": "m", "input": ["a", "b"], "encoding_format": "base64"}
    assert retrieval.embeddings_request(dict(payload), MINILM) == payload


def test_input_type_adds_the_models_prefix_and_symmetric_models_take_none() -> None:
    e5 = _with(MINILM, query_prefix="query: ", passage_prefix="passage: ")
    out = retrieval.embeddings_request({"input": "cats", "input_type": "query"}, e5)
    assert out == {"input": ["query: cats"]}
    out = retrieval.embeddings_request({"input": ["a", "b"], "input_type": "passage"}, e5)
    assert out == {"input": ["passage: a", "passage: b"]}
    assert retrieval.embeddings_request({"input": "x", "input_type": "query"}, MINILM) == {
        "input": "x"
    }
    with pytest.raises(InvalidRequestError, match="token ids") as info:
        retrieval.embeddings_request({"input": [[1, 2]], "input_type": "query"}, e5)
    assert info.value.param == "input_type"


@pytest.mark.parametrize(
    ("truncate", "fields"),
    [
        ("NONE", {}),
        ("none", {}),
        ("START", {"truncate_prompt_tokens": -1, "truncation_side": "left"}),
        ("END", {"truncate_prompt_tokens": -1, "truncation_side": "right"}),
    ],
)
def test_truncate_becomes_the_side_to_cut(truncate: str, fields: dict[str, Any]) -> None:
    out = retrieval.embeddings_request({"input": "x", "truncate": truncate}, MINILM)
    assert out == {"input": "x", **fields}


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"truncate": "MIDDLE"}, "truncate", "NONE, START, END"),
        ({"truncate": 3}, "truncate", "NONE, START, END"),
        ({"input_type": "document"}, "input_type", "query or passage"),
        ({"encoding_format": "bytes"}, "encoding_format", "float or base64"),
        ({"dimensions": 128}, "dimensions", "not trained to be shortened"),
        ({"dimensions": 0}, "dimensions", "positive"),
        ({"dimensions": True}, "dimensions", "positive"),
        ({"input": []}, "input", "non-empty"),
        ({"input": None}, "input", "required"),
    ],
)
def test_bad_embedding_requests_name_the_field(
    extra: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(InvalidRequestError, match=words) as info:
        retrieval.embeddings_request({"input": "x", **extra}, MINILM)
    assert info.value.param == param


def test_dimensions_full_length_is_dropped_and_matryoshka_models_shorten() -> None:
    assert retrieval.embeddings_request({"input": "x", "dimensions": 384}, MINILM) == {"input": "x"}
    nomic = _with(MINILM, matryoshka=(256, 128))
    out = retrieval.embeddings_request({"input": "x", "dimensions": 128}, nomic)
    assert out["dimensions"] == 128
    for dims in (512, 100):
        with pytest.raises(InvalidRequestError, match="trained to be cut to 384, 256, 128"):
            retrieval.embeddings_request({"input": "x", "dimensions": dims}, nomic)


def test_ranking_request_and_answer_in_nim_shape() -> None:
    request = {
        "model": "m",
        "query": {"text": "q"},
        "passages": [{"text": "a"}, {"text": "b"}],
        "truncate": "END",
    }
    assert retrieval.ranking_request(request) == {
        "model": "m",
        "query": "q",
        "documents": ["a", "b"],
        "truncate_prompt_tokens": -1,
        "truncation_side": "right",
    }
    answer = {
        "results": [
            {"index": 0, "relevance_score": 0.1, "document": {"text": "a"}},
            {"index": 1, "relevance_score": 0.7, "document": {"text": "b"}},
        ],
        "usage": {"total_tokens": 9},
    }
    assert retrieval.ranking_answer(answer) == {
        "rankings": [{"index": 1, "logit": 0.7}, {"index": 0, "logit": 0.1}]
    }


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        ({"query": {"text": "q"}, "passages": []}, "passages"),
        ({"query": {"text": "q"}, "passages": ["a"]}, "passages[0]"),
        ({"query": "q", "passages": [{"text": "a"}]}, "query"),
        ({"query": {"text": "q"}, "passages": [{"text": "a"}], "truncate": "START"}, "truncate"),
        ({"query": {"text": "q"}, "passages": [{"text": "a"}], "top_n": 1}, "top_n"),
    ],
)
def test_bad_ranking_requests_name_the_field(request_: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        retrieval.ranking_request({"model": "m", **request_})
    assert info.value.param == param


def test_rerank_drops_documents_only_when_asked() -> None:
    payload, reshape = retrieval.rerank_request({"query": "q", "documents": ["a"]})
    assert reshape is None and payload == {"query": "q", "documents": ["a"]}
    payload, reshape = retrieval.rerank_request(
        {"query": "q", "documents": ["a"], "return_documents": False}
    )
    assert "return_documents" not in payload and reshape is not None
    answer = reshape({"results": [{"index": 0, "relevance_score": 1.0, "document": {"text": "a"}}]})
    assert answer == {"results": [{"index": 0, "relevance_score": 1.0}]}
    with pytest.raises(InvalidRequestError):
        retrieval.rerank_request({"return_documents": "no"})


def test_each_model_serves_the_routes_of_its_task() -> None:
    retrieval.check_route(CHAT, "/v1/chat/completions", "/v1/chat/completions")
    retrieval.check_route(MINILM, "/v1/embeddings", "/v1/embeddings")
    retrieval.check_route(MINILM, "/rerank", "/v1/ranking")
    retrieval.check_route(MINILM, "/tokenize", "/v1/tokenize")
    with pytest.raises(InvalidRequestError, match="embedding model: it serves /v1/embeddings"):
        retrieval.check_route(MINILM, "/v1/chat/completions", "/v1/chat/completions")
    with pytest.raises(InvalidRequestError, match="chat model") as info:
        retrieval.check_route(CHAT, "/v1/embeddings", "/v1/embeddings")
    assert info.value.param == "model"


def test_metadata_says_how_an_embedding_model_ranks() -> None:
    info = retrieval.describe(MINILM)
    assert info["embedding"]["dimensions"] == 384
    assert "cosine" in info["ranking"]["method"]
    assert retrieval.describe(CHAT) == {}
