"""The llama.cpp engine: its command line follows the profile, vLLM-shaped requests are
translated where llama-server differs, and a shipped GGUF is re-quantized for a profile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inferd.cache.prepare import _requantized_name
from inferd.cache.requantize import find_quantizer, run_requantize
from inferd.catalog import Catalog
from inferd.engines import llamacpp_build
from inferd.engines.llamacpp import LlamaCppEngine, find_binary, gpu_support
from inferd.errors import CacheError, EngineStartError
from tests.unit.test_engines import _flags


def _engine(tmp: Path, profile: str = "llamacpp-cpu-q8_0") -> LlamaCppEngine:
    entry = Catalog.load().get("smollm2-135m-instruct")
    p = entry.profile(profile)
    assert p is not None
    return LlamaCppEngine(entry.id, tmp, p, ["--seed", "1"], tmp / "cache", None)


@pytest.mark.built
def test_command_serves_the_gguf_with_one_slot_per_admitted_request(tmp_path: Path) -> None:
    if find_binary() is None:
        pytest.skip("llama-server is not built (make install builds it)")
    (tmp_path / "m.Q8_0.gguf").write_bytes(b"GGUF")
    cmd = _engine(tmp_path).command(Path("/r/engine-1.sock"))
    flags = _flags(cmd.argv)
    assert flags["--model"] == str(tmp_path / "m.Q8_0.gguf")
    assert flags["--alias"] == "smollm2-135m-instruct"
    assert flags["--parallel"] == "4"
    # llama-server splits its KV cache across slots: each slot gets the full context.
    assert flags["--ctx-size"] == str(8192 * 4)
    assert "--metrics" in cmd.argv
    assert cmd.argv[-2:] == ["--seed", "1"]  # pass-through last: it wins


def test_no_gguf_in_the_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineStartError, match="no GGUF file"):
        _engine(tmp_path).gguf()


def test_tokenize_and_detokenize_are_translated(tmp_path: Path) -> None:
    e = _engine(tmp_path)
    asked = e.adapt("/tokenize", {"model": "m", "prompt": "hi", "add_special_tokens": False})
    assert asked == {"content": "hi", "add_special": False}
    answer = e.adapt_answer("/tokenize", {"tokens": [1, 2, 3]})
    assert answer == {"count": 3, "max_model_len": 8192, "tokens": [1, 2, 3]}
    assert e.adapt_answer("/detokenize", {"content": "hi"}) == {"prompt": "hi"}


def test_its_slots_say_how_many_requests_it_works_on(tmp_path: Path) -> None:
    e = _engine(tmp_path)
    assert e.working_path == "/slots"
    # llama-server's /slots answer (tools/server, `slot.to_json` without debug fields).
    slots = [
        {"id": 0, "n_ctx": 8192, "speculative": False, "is_processing": True},
        {"id": 1, "n_ctx": 8192, "speculative": False, "is_processing": False},
        {"id": 2, "n_ctx": 8192, "speculative": False, "is_processing": True},
    ]
    assert e.working(slots) == 2
    assert e.working({"error": {"message": "slots endpoint disabled"}}) is None


def test_vllm_names_are_accepted_and_renamed(tmp_path: Path) -> None:
    e = _engine(tmp_path)
    accepted = e.accepted_params("/v1/chat/completions")
    assert accepted is not None
    assert {"repetition_penalty", "max_completion_tokens", "top_k", "min_p"} <= accepted
    assert "best_of" not in accepted  # llama-server would ignore it: inferd refuses it
    assert e.param_aliases["repetition_penalty"] == "repeat_penalty"


@pytest.mark.parametrize(
    ("shipped", "precision", "expected"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "q8_0", "SmolLM2-135M-Instruct.Q8_0.gguf"),
        ("model.gguf", "q8_0", "model.Q8_0.gguf"),
        ("sub/foo.v2.gguf", "q4_1", "foo.v2.Q4_1.gguf"),
    ],
)
def test_requantized_file_names(shipped: str, precision: str, expected: str) -> None:
    assert _requantized_name(shipped, precision) == expected


@pytest.mark.built
def test_requantize_refuses_unknown_types_and_reports_tool_failures(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="no GGUF quantization type"):
        run_requantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "awq")
    if find_quantizer() is None:
        pytest.skip("llama-quantize is not built (make install builds it)")
    bad = tmp_path / "in.gguf"
    bad.write_bytes(os.urandom(4096))  # not a GGUF: llama-quantize must fail, and we must say so
    with pytest.raises(CacheError, match=r"re-quantizing in\.gguf to Q8_0 failed"):
        run_requantize(bad, tmp_path / "out.gguf", "q8_0")


def test_prompt_too_long_reads_llama_servers_own_count(tmp_path: Path) -> None:
    e = _engine(tmp_path)
    said = (
        b'{"error":{"code":400,"message":"request (9000 tokens) exceeds the available context '
        b'size (8192 tokens), try increasing it","type":"exceed_context_size_error"}}'
    )
    assert e.prompt_too_long(said) == (9000, 8192)
    assert e.prompt_too_long(b'{"error":{"message":"bad"}}') is None


def test_completion_logprobs_are_given_in_the_legacy_shape(tmp_path: Path) -> None:
    def item(token: str, lp: float) -> dict[str, object]:
        top = [{"token": token, "logprob": lp}, {"token": "x", "logprob": lp - 1}]
        return {"id": 1, "token": token, "bytes": [], "logprob": lp, "top_logprobs": top}

    adapt = _engine(tmp_path).event_adapter("/v1/completions")
    assert adapt is not None
    first = {
        "choices": [
            {
                "index": 0,
                "text": "-by",
                "logprobs": {"content": [item("-", -1.0), item("by", -0.5)]},
            }
        ]
    }
    second = {
        "choices": [{"index": 0, "text": "-day", "logprobs": {"content": [item("-day", -0.2)]}}]
    }
    assert adapt(first)["choices"][0]["logprobs"] == {
        "tokens": ["-", "by"],
        "token_logprobs": [-1.0, -0.5],
        "top_logprobs": [{"-": -1.0, "x": -2.0}, {"by": -0.5, "x": -1.5}],
        "text_offset": [0, 1],
    }
    # A stream's offsets run on from event to event.
    assert adapt(second)["choices"][0]["logprobs"]["text_offset"] == [3]
    assert _engine(tmp_path).event_adapter("/v1/chat/completions") is None


def test_dry_run_names_the_gguf_folder_before_it_exists(tmp_path: Path) -> None:
    e = _engine(tmp_path / "not-yet")
    assert e.gguf() == tmp_path / "not-yet" / "*.gguf"


def test_cpu_profiles_stay_off_gpus_and_gpu_profiles_offload_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    binary = tmp_path / "bin" / "llama-server"
    binary.parent.mkdir()
    binary.write_text("")
    stamp = binary.with_name("llama-server.json")
    monkeypatch.setattr("inferd.engines.llamacpp.find_binary", lambda: str(binary))
    # A CUDA build would otherwise offload a CPU profile's layers to whatever GPU it sees.
    stamp.write_text('{"flags": "-DGGML_CUDA=ON", "cuda": "90"}')
    cpu = _flags(_engine(tmp_path).command(Path("/r/engine-1.sock")).argv)
    assert cpu["--device"] == "none" and "--n-gpu-layers" not in cpu
    gpu = _engine(tmp_path, "llamacpp-gpu-q4_1")
    flags = _flags(gpu.command(Path("/r/engine-1.sock")).argv)
    assert flags["--device"] == "CUDA0" and flags["--n-gpu-layers"] == "all"
    assert flags["--parallel"] == "16"
    # A CPU build gets no --device: llama-servers older than the flag would refuse it.
    stamp.write_text('{"flags": ""}')
    assert "--device" not in _engine(tmp_path).command(Path("/r/engine-1.sock")).argv


def test_no_prompt_cache_in_ram_unless_the_user_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr("inferd.engines.llamacpp.find_binary", lambda: "/bin/llama-server")
    monkeypatch.delenv("LLAMA_ARG_CACHE_RAM", raising=False)
    for profile in ("llamacpp-cpu-q8_0", "llamacpp-gpu-q4_1"):
        cmd = _engine(tmp_path, profile).command(Path("/r/engine-1.sock"))
        assert cmd.env["LLAMA_ARG_CACHE_RAM"] == "0"
        assert "--cache-ram" not in cmd.argv  # an older llama-server would refuse the flag
    # The user's own setting, in inferd's environment, reaches the engine as it is.
    monkeypatch.setenv("LLAMA_ARG_CACHE_RAM", "2048")
    assert "LLAMA_ARG_CACHE_RAM" not in _engine(tmp_path).command(Path("/r/e.sock")).env


@pytest.mark.built
def test_gpu_support_reads_the_build_stamp_or_asks_the_binary(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    stamp = tmp_path / "llama-server.json"
    stamp.write_text('{"source": "x", "flags": ""}')
    assert "built without CUDA" in (gpu_support(str(binary)) or "")
    stamp.write_text('{"source": "x", "flags": "-DGGML_CUDA=ON", "cuda": "90"}')
    assert gpu_support(str(binary)) is None
    assert gpu_support(str(binary), ((9, 0),)) is None
    # Built for Hopper only: an A100 (8.0) cannot run it.
    assert "not for compute capability 8.0" in (gpu_support(str(binary), ((8, 0),)) or "")
    stamp.write_text("[1, 2]")  # not a stamp inferd wrote
    assert "built without CUDA" in (gpu_support(str(binary)) or "")
    # No stamp (a llama-server from elsewhere): its own device list decides.
    stamp.unlink()
    binary.write_text(
        "#!/bin/sh\necho 'Available devices:'\necho '  CUDA0: NVIDIA H200 (143156 MiB, 142000 "
        "MiB free)'\n"
    )
    binary.chmod(0o755)
    assert gpu_support(str(binary)) is None
    binary.write_text("#!/bin/sh\necho 'Available devices:'\necho '  (none)'\n")
    assert "lists no CUDA device" in (gpu_support(str(binary)) or "")
    # The real CPU build here lists none.
    real = find_binary()
    if real is not None and not Path(real).with_name("llama-server.json").is_file():
        assert gpu_support(real) is not None


def test_cuda_builds_add_ggmls_cuda_backend_for_the_gpus_found() -> None:
    assert "-DGGML_CUDA=ON" not in llamacpp_build.flags(False)
    cuda = llamacpp_build.flags(False, "90")
    assert "-DGGML_CUDA=ON" in cuda and "-DCMAKE_CUDA_ARCHITECTURES=90" in cuda
    assert "-DGGML_NATIVE=ON" in cuda  # the CPU side stays native
    assert llamacpp_build.cuda_choice("off", "90") is None
    with pytest.raises(SystemExit, match="CMake's form"):
        llamacpp_build.cuda_choice("on", "sm_90")
    # auto: nothing without nvcc (this machine has none) or without a GPU.
    if llamacpp_build.find_nvcc() is None:
        assert llamacpp_build.cuda_choice("auto", "90") is None
        with pytest.raises(SystemExit, match="nvcc"):
            llamacpp_build.cuda_choice("on", "90")


@pytest.mark.parametrize(
    "answer",
    [
        # llama-server 0.3.36's own 500s for malformed requests (seen in the adversarial suite).
        b'{"error":{"code":500,"message":"Failed to parse messages: Missing \'role\' in message"}}',
        b'{"error":{"code":500,"message":"[json.exception.parse_error.101] parse error"}}',
        b'{"error":{"code":500,"message":"image input is not supported - hint: mmproj"}}',
        b'{"error":{"code":500,"message":"audio input is not supported - hint: if this is '
        b'unexpected, you may need to provide the mmproj","type":"server_error"}}',
    ],
)
def test_llama_servers_500s_for_malformed_requests_are_the_clients(
    tmp_path: Path, answer: bytes
) -> None:
    engine = _engine(tmp_path)
    assert engine.clients_fault(500, answer)


def test_other_llama_server_errors_stay_the_engines(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    assert not engine.clients_fault(500, b'{"error":{"code":500,"message":"out of memory"}}')
    assert not engine.clients_fault(503, b'{"error":{"message":"Failed to parse messages"}}')
