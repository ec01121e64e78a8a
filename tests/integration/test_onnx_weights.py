"""INT8 ONNX cross-encoders become folders vLLM loads: a tiny BERT classifier, built at run time,
exported to ONNX and dynamically quantized the way onnxruntime does it (as the shipped
ms-marco cross-encoder was), converted by the cache, then loaded by transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inferd.cache.onnx_weights import convert_onnx, dequantized_weights
from inferd.catalog import Catalog
from inferd.catalog.schema import Architecture, ModelEntry
from inferd.errors import CacheError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")

VOCAB, HIDDEN, LAYERS = 30522, 64, 2
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# The quantized file, the torch model it came from, and inputs for both.
Tiny = tuple[Path, Any, dict[str, Any]]


def _entry() -> ModelEntry:
    real = Catalog.load().get("ms-marco-minilm-l-12-v2")
    arch = Architecture(
        layers=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=128,
        attention_heads=4,
        kv_heads=4,
        head_dim=16,
        vocab_size=VOCAB,
        max_context=512,
        tied_embeddings=True,
    )
    return real.model_copy(update={"architecture": arch})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    folder = tmp_path_factory.mktemp("tiny-onnx")
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=1,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():  # trained weights: no two biases alike (fresh ones are all zero)
        for name, value in model.named_parameters():
            if name.endswith(".bias"):
                value.normal_(0, 0.02)
    ids = torch.randint(1000, VOCAB, (3, 12))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    feeds["token_type_ids"] = torch.zeros_like(ids)
    axes = {name: {0: "batch", 1: "tokens"} for name in INPUTS}
    torch.onnx.export(
        model,
        tuple(feeds[n] for n in INPUTS),
        str(folder / "fp32.onnx"),
        input_names=list(INPUTS),
        output_names=["logits"],
        dynamic_axes=axes,
        opset_version=14,
        dynamo=False,
    )
    quantization.quantize_dynamic(
        str(folder / "fp32.onnx"),
        str(folder / "model.onnx"),
        weight_type=quantization.QuantType.QInt8,
    )
    return folder / "model.onnx", model, feeds


def test_every_weight_is_named_and_dequantized(
    tiny: Tiny,
) -> None:
    onnx_file, model, _ = tiny
    weights = dequantized_weights(onnx_file)
    expected = {k: v for k, v in model.state_dict().items() if "position_ids" not in k}
    assert set(weights) == set(expected)
    for name, value in weights.items():
        original = expected[name].numpy()
        assert value.shape == original.shape, name
        # INT8 steps: within one quantization step of the original weight.
        step = (abs(original).max() * 2 / 255) + 1e-6
        assert abs(value - original).max() <= step, name


def test_the_converted_folder_scores_like_the_onnx_file(tiny: Tiny, tmp_path: Path) -> None:
    onnx_file, model, feeds = tiny
    provenance = convert_onnx(onnx_file, tmp_path, _entry())
    assert provenance["tensors"] == len([k for k in model.state_dict() if "position_ids" not in k])
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours = loaded(**feeds).logits.numpy().ravel()
        original = model(**feeds).logits.numpy().ravel()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {n: feeds[n].numpy() for n in INPUTS})[0].ravel()
    # The dequantized weights are the INT8 file's; onnxruntime also quantizes activations,
    # so its logits differ a little more from ours than ours from the fp32 original.
    assert abs(ours - onnx_logits).max() < 0.05
    assert abs(ours - original).max() < 0.05


def test_a_file_that_is_not_a_bert_classifier_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    with pytest.raises(CacheError, match="not a BERT sequence classifier"):
        convert_onnx(tmp_path / "other.onnx", tmp_path, _entry())
