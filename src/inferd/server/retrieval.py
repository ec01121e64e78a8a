"""NIM's retrieval API (NeMo Retriever's embedding and ranking formats) over inferd's engines.

inferd's own API is vLLM-shaped; what NIM adds is translated here, once, for every engine:

- `/v1/embeddings` takes NIM's `input_type` (`query`/`passage`: the model's prefix, where its card
  names one, goes before each text), `truncate` (`NONE`: a too-long input is refused with its
  token count; `START`/`END`: cut from that end to the model's length), `dimensions` (refused
  unless the model was trained to be shortened) and `encoding_format` (`float` or `base64`).
- `/v1/ranking` (`{query: {text}, passages: [{text}], truncate}`) becomes the engine's `/rerank`
  (the Cohere/Jina format vLLM serves, also offered as `/v1/rerank`), and its answer becomes
  `{rankings: [{index, logit}]}`, best first.

Which routes a model serves follows its task: a chat request to an embedding model is a clear 400,
not whatever the engine would make of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from inferd.catalog.schema import ModelEntry
from inferd.errors import InvalidRequestError

GENERATION = frozenset({"/v1/chat/completions", "/v1/completions"})
RETRIEVAL = frozenset({"/v1/embeddings", "/rerank"})
# Engine routes each task serves; tokenize/detokenize serve every model.
ROUTES_BY_TASK: dict[str, frozenset[str]] = {
    "chat": GENERATION,
    "completion": frozenset({"/v1/completions"}),
    "guard": GENERATION,
    "embedding": RETRIEVAL,
    "rerank": frozenset({"/rerank"}),
}
# What each task serves and is called, for the refusal.
SERVES = {
    "chat": ("a chat model", "/v1/chat/completions and /v1/completions"),
    "completion": ("a text-completion model", "/v1/completions"),
    "guard": ("a guard model", "/v1/chat/completions and /v1/completions"),
    "embedding": ("an embedding model", "/v1/embeddings, /v1/ranking and /v1/rerank"),
    "rerank": ("a reranking model", "/v1/ranking and /v1/rerank"),
}
TRUNCATE = {"NONE": None, "START": "left", "END": "right"}


def check_route(entry: ModelEntry, engine_path: str, front_route: str) -> None:
    """Refuse a request its model cannot serve, naming the routes it does serve."""
    allowed = ROUTES_BY_TASK.get(entry.task)
    if allowed is None or engine_path in allowed or engine_path in ("/tokenize", "/detokenize"):
        return
    kind, serves = SERVES[entry.task]
    raise InvalidRequestError(
        f"model {entry.id} is {kind}: it serves {serves}, not {front_route}", param="model"
    )


def describe(entry: ModelEntry) -> dict[str, Any]:
    """What `/v1/metadata` says about a retrieval model: its vectors and how it ranks."""
    if entry.task == "rerank":
        return {
            "ranking": {
                "method": "cross-encoder: the model reads query and passage together",
                "score": "the model's relevance logit (higher is more relevant)",
            }
        }
    spec = entry.embedding
    if spec is None:
        return {}
    return {
        "embedding": {
            "dimensions": spec.dimensions,
            "shorter_dimensions": list(spec.matryoshka),
            "query_prefix": spec.query_prefix,
            "passage_prefix": spec.passage_prefix,
        },
        "ranking": {
            "method": (
                "bi-encoder: cosine similarity of the query's and each passage's embedding "
                "(no cross-encoder is served with this model)"
            ),
            "score": "cosine similarity in [-1, 1], returned as `logit` by /v1/ranking",
        },
    }


def _truncation(payload: dict[str, Any], allowed: tuple[str, ...]) -> str | None:
    """NIM's `truncate` as the side to cut (vLLM's `truncation_side`), or None for NONE."""
    value = payload.pop("truncate", None)
    if value is None:
        return None
    if not isinstance(value, str) or value.upper() not in allowed:
        raise InvalidRequestError(
            f"truncate must be one of {', '.join(allowed)}; got {value!r}", param="truncate"
        )
    return TRUNCATE[value.upper()]


def _cut(payload: dict[str, Any], side: str | None) -> None:
    if side is not None:
        # -1: the model's own maximum length; the side says which end goes.
        payload["truncate_prompt_tokens"] = -1
        payload["truncation_side"] = side


def embeddings_request(payload: dict[str, Any], entry: ModelEntry) -> dict[str, Any]:
    """NIM's extras on an OpenAI embeddings request, in the engine's (vLLM's) terms."""
    spec = entry.embedding
    assert spec is not None  # check_route let only embedding models through
    texts = payload.get("input")
    if texts is None:
        raise InvalidRequestError("input is required: a string or a list of strings", param="input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise InvalidRequestError("input must be a string or a non-empty list", param="input")
    input_type = payload.pop("input_type", None)
    if input_type is not None:
        if input_type not in ("query", "passage"):
            raise InvalidRequestError(
                f"input_type must be query or passage; got {input_type!r}", param="input_type"
            )
        prefix = spec.query_prefix if input_type == "query" else spec.passage_prefix
        if prefix:
            if not all(isinstance(t, str) for t in texts):
                raise InvalidRequestError(
                    f"input_type adds the model's {input_type} prefix to text; token ids "
                    "cannot take it: send text, or leave input_type out",
                    param="input_type",
                )
            payload["input"] = [prefix + t for t in texts]
    _cut(payload, _truncation(payload, ("NONE", "START", "END")))
    fmt = payload.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidRequestError(
            f"encoding_format must be float or base64; got {fmt!r}", param="encoding_format"
        )
    dims = payload.get("dimensions")
    if dims is not None:
        if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
            raise InvalidRequestError("dimensions must be a positive integer", param="dimensions")
        if dims == spec.dimensions:
            del payload["dimensions"]  # asking for the full length is asking for nothing
        elif not spec.matryoshka:
            raise InvalidRequestError(
                f"model {entry.id} gives {spec.dimensions}-dimension embeddings and was not "
                "trained to be shortened (cut vectors would lose their meaning); leave "
                f"dimensions out or ask for {spec.dimensions}",
                param="dimensions",
            )
        elif dims not in spec.matryoshka:
            lengths = ", ".join(str(d) for d in (spec.dimensions, *spec.matryoshka))
            raise InvalidRequestError(
                f"model {entry.id} was trained to be cut to {lengths} dimensions, not {dims}",
                param="dimensions",
            )
    return payload


def _text(item: object, where: str) -> str:
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return str(item["text"])
    raise InvalidRequestError(f"{where} must be an object with a text string", param=where)


def ranking_request(payload: dict[str, Any], *, logits: bool = False) -> dict[str, Any]:
    """NIM's `/v1/ranking` request as the engine's `/rerank` request. `logits`: a
    cross-encoder's raw relevance logit, as NIM returns, not the engine's default sigmoid."""
    passages = payload.get("passages")
    if not isinstance(passages, list) or not passages:
        raise InvalidRequestError("passages must be a non-empty list of {text}", param="passages")
    unknown = sorted(set(payload) - {"model", "query", "passages", "truncate"})
    if unknown:
        raise InvalidRequestError(
            f"unknown field(s) for /v1/ranking: {', '.join(unknown)}", param=unknown[0]
        )
    request: dict[str, Any] = {
        "model": payload.get("model"),
        "query": _text(payload.get("query"), "query"),
        "documents": [_text(p, f"passages[{i}]") for i, p in enumerate(passages)],
    }
    _cut(request, _truncation(payload, ("NONE", "END")))
    if logits:
        request["use_activation"] = False
    return request


def ranking_answer(answer: dict[str, Any]) -> dict[str, Any]:
    """The engine's rerank answer as NIM's: `{rankings: [{index, logit}]}`, best first."""
    results = answer.get("results") or []
    rankings = [
        {"index": int(r["index"]), "logit": float(r["relevance_score"])}
        for r in results
        if isinstance(r, dict)
    ]
    rankings.sort(key=lambda r: r["logit"], reverse=True)
    return {"rankings": rankings}


def rerank_request(payload: dict[str, Any]) -> Reshaped:
    """Cohere's and Jina's `/v1/rerank`: the engine's own format, plus `return_documents`
    (Cohere's), which the engine does not know: it always returns them, so inferd drops them
    when asked to."""
    keep = payload.pop("return_documents", None)
    if keep is not None and not isinstance(keep, bool):
        raise InvalidRequestError(
            "return_documents must be true or false", param="return_documents"
        )
    if keep is not False:
        return Reshaped(payload, None)

    def drop_documents(answer: dict[str, Any]) -> dict[str, Any]:
        for result in answer.get("results") or []:
            if isinstance(result, dict):
                result.pop("document", None)
        return answer

    return Reshaped(payload, drop_documents)


class Reshaped(NamedTuple):
    """A request in the engine's terms, and what its answer needs on the way back, if anything."""

    payload: dict[str, Any]
    answer: Callable[[dict[str, Any]], dict[str, Any]] | None = None


Shape = Callable[[dict[str, Any], ModelEntry], Reshaped]
# Front routes whose requests (and answers) differ from their engine route's.
SHAPES: dict[str, Shape] = {
    "/v1/embeddings": lambda p, entry: Reshaped(embeddings_request(p, entry)),
    "/v1/ranking": lambda p, entry: Reshaped(
        ranking_request(p, logits=entry.task == "rerank"), ranking_answer
    ),
    "/v1/rerank": lambda p, _: rerank_request(p),
}
