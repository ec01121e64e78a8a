"""GGUF -> safetensors conversion, run as its own process (`python -m inferd.cache.convert`).

Why a subprocess: the conversion needs torch and transformers (about a gigabyte of memory once
imported); running it apart keeps the long-lived front process small and lets a crash in a
third-party library surface as a clear `ConversionError` instead of taking the server down.

Transformers de-quantizes a GGUF checkpoint into a normal Hugging Face model; the GGUF
quantization marker is dropped before saving so the result is a plain checkpoint (weights in the
requested dtype, config, tokenizer with its chat template) that vLLM loads. The child prints one
JSON object per line on stdout (`{"stage": ...}`) so the parent can show progress; anything else
it prints goes to stderr. `prepare` calls `run_conversion` and records provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from inferd.cache.reporting import SILENT, Reporter
from inferd.errors import CacheError

CONVERTER_PACKAGES = ("transformers", "gguf", "torch", "safetensors")
STAGES = ("tokenizer", "weights", "save", "done")


def converter_versions() -> dict[str, str]:
    versions = {}
    for name in CONVERTER_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def _special_token_flags(gguf: Path) -> dict[str, bool]:
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    flags = {}
    for flag in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{flag}")
        if field is not None:
            flags[flag] = bool(field.parts[field.data[0]][0])
    return flags


def convert(
    gguf: Path, out: Path, dtype_name: str, emit: Callable[[str], None], chat: bool = True
) -> None:
    """The child's work. Imports are local: only this process pays for torch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    emit("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if chat and not tokenizer.chat_template:
        raise SystemExit("the GGUF file carries no chat template, which a chat model needs")
    # transformers drops the GGUF's add-BOS/EOS flags; models such as Gemma answer garbage
    # without their BOS token, so carry the flags over.
    for flag, value in _special_token_flags(gguf).items():
        setattr(tokenizer, flag, value)
    emit("weights")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    # Drop the GGUF marker so the checkpoint is saved (and later loaded) as plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    emit("save")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    emit("done")


def run_conversion(
    gguf: Path,
    out: Path,
    dtype: str,
    reporter: Reporter = SILENT,
    *,
    chat: bool = True,
    on_spawn: Callable[[int], None] | None = None,
) -> float:
    """Convert in a child process; returns the seconds it took. Raises `CacheError` on failure.
    `on_spawn` is told the child's pid as soon as it runs: a conversion behind an engine that
    serves is lowered and paused by that engine's supervisor as a start is (`server.supervisor`)."""
    started = time.monotonic()
    cmd = [sys.executable, "-m", "inferd.cache.convert", str(gguf), str(out), "--dtype", dtype]
    if chat:
        cmd.append("--chat")
    # Conversion is offline by construction: the GGUF carries config and tokenizer.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    task = reporter.task(f"convert {gguf.name} -> safetensors ({dtype})", len(STAGES))
    # stderr goes to a file, not a pipe: libraries' progress bars could fill a pipe and stall.
    with task as advance, tempfile.TemporaryFile("w+") as errfile:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errfile, text=True, env=env)
        assert proc.stdout is not None
        try:
            if on_spawn is not None:
                on_spawn(proc.pid)
            for line in proc.stdout:
                if line.startswith('{"stage"'):
                    advance(1)
            code = proc.wait()
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): the child must not outlive us
            proc.kill()
            proc.wait()
            raise
        errfile.seek(0)
        err = errfile.read()
    if code != 0:
        tail = " | ".join(err.strip().splitlines()[-3:]) or f"exit code {code}"
        raise CacheError(f"conversion of {gguf.name} failed: {tail}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert a GGUF checkpoint to safetensors.")
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--chat", action="store_true", help="require a chat template")
    args = parser.parse_args()
    # Keep stdout for progress lines: libraries' chatter goes to stderr.
    progress_out, sys.stdout = sys.stdout, sys.stderr

    def emit(stage: str) -> None:
        print(json.dumps({"stage": stage}), file=progress_out, flush=True)

    convert(args.gguf, args.out, args.dtype, emit, chat=args.chat)


if __name__ == "__main__":
    main()
