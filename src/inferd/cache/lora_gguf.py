"""A PEFT LoRA adapter as a GGUF LoRA for llama-server, made by llama.cpp's own converter.

Run as its own process (`python -m inferd.cache.lora_gguf`), like `cache.convert`: the
conversion imports torch and transformers, which the front must not carry. The converter is
`convert_lora_to_gguf.py` from the llama.cpp source the install pins (the build keeps it with
its gguf-py: `engines.llamacpp_build.converter_dir`); the caller passes its path, since `cache`
does not import `engines`. It needs the base model's Hugging Face config: a safetensors model
folder has it; a GGUF-only folder (what llama.cpp profiles load) gets one written from the GGUF's
metadata by transformers first. The converter then runs as a grandchild: it imports its vendored
gguf-py, which must not meet the installed `gguf` that transformers has already imported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inferd.errors import AdapterError

OUTTYPE = "f16"
TIMEOUT_S = 600


def run_conversion(adapter: Path, out: Path, base: Path, script: Path) -> float:
    """Convert `adapter` into the GGUF file `out` in a child process; the seconds it took.
    `AdapterError` with the converter's last lines when it fails."""
    started = time.monotonic()
    cmd = [
        sys.executable,
        "-m",
        "inferd.cache.lora_gguf",
        str(adapter),
        str(out),
        "--base",
        str(base),
        "--script",
        str(script),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py it came with
    with tempfile.TemporaryFile("w+") as errfile:
        try:
            done = subprocess.run(
                cmd, stdout=errfile, stderr=errfile, env=env, timeout=TIMEOUT_S, check=False
            )
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = -1
        errfile.seek(0)
        err = errfile.read()
    if code != 0 or not out.is_file():
        tail = " | ".join(err.strip().splitlines()[-3:]) or f"exit code {code}"
        raise AdapterError(f"adapter {adapter.name}: conversion to GGUF failed: {tail}")
    return time.monotonic() - started


def base_config(base: Path, scratch: Path) -> Path:
    """A folder holding the base model's `config.json`: `base` itself, or one written into
    `scratch` from the metadata of the GGUF in `base`."""
    if (base / "config.json").is_file():
        return base
    ggufs = sorted(base.glob("*.gguf"))
    if not ggufs:
        raise SystemExit(f"{base} has neither config.json nor a GGUF file")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(str(base), gguf_file=ggufs[0].name)
    if not config.architectures:  # the converter picks its model class by this name
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(str(scratch))
    return scratch


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert a PEFT LoRA adapter to GGUF.")
    parser.add_argument("adapter", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", type=Path, required=True, help="the base model's folder")
    parser.add_argument("--script", type=Path, required=True, help="convert_lora_to_gguf.py")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora-base-") as scratch:
        config = base_config(args.base, Path(scratch))
        cmd = [
            sys.executable,
            str(args.script),
            str(args.adapter),
            "--outfile",
            str(args.out),
            "--outtype",
            OUTTYPE,
            "--base",
            str(config),
        ]
        sys.exit(subprocess.run(cmd, check=False).returncode)


if __name__ == "__main__":
    main()
