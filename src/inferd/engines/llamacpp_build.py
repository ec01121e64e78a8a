"""Build llama.cpp's `llama-server` (and `llama-quantize`) from source.

Run as `python -m inferd.engines.llamacpp_build`.

No prebuilt llama-server can be fetched here (no GitHub; the PyPI packages that build one wrap
MIT llama.cpp in AGPL packaging), so the install step compiles it. The source comes from the
PyPI sdist of llama-cpp-python (MIT), which vendors llama.cpp whole, pinned by version and
sha256. Only two targets are built, for this machine's CPU (`-march=native`): `llama-server`, the
engine, and `llama-quantize`, which the cache uses to re-quantize a shipped GGUF into the type a
profile serves (Q4_1 -> Q8_0). `-fno-tree-dse -fno-dse`: GCC 12 (Debian 12's compiler) drops the
stores that fill ggml's AMX tile configuration, because its `_tile_loadconfig` does not tell the
optimizer that it reads them; `ldtilecfg` then loads garbage and the server dies with SIGSEGV in
ggml_backend_amx_mul_mat on the first prompt (seen on this project's AMX machine; the assembly
shows the stores gone, and present with these flags). With them the AMX kernels work and double
llama.cpp's single-stream speed there (benchmarks/RESULTS.md); elsewhere they only forgo that
optimisation (not measured apart). The binaries land next to the Python interpreter
(`.venv/bin/`), with a stamp recording what they were built from; a second run with the same pin
does nothing.

NVIDIA GPUs: where CUDA's compiler (`nvcc`) and a GPU are both present, the build adds ggml's CUDA
backend for the GPUs found (`--cuda auto`, the default; `on` insists, `off` never), so the GPU
profiles (`llamacpp-gpu-*`) can offload every layer; the stamp records it (`"cuda"`), which is how
inferd knows this llama-server can serve them. `--source DIR` builds from a llama.cpp tree on disk
instead of the pinned sdist (machines that reach no package index).

LoRA adapters: llama-server loads adapters as GGUF files, made from Hugging Face PEFT adapters by
llama.cpp's own `convert_lora_to_gguf.py`. The build keeps that converter, the model definitions
it imports (`conversion/`, `convert_hf_to_gguf.py`) and the gguf-py they use, from the same
pinned source, under `PREFIX/share/inferd/llama.cpp/` (`converter_dir`), with a stamp of its
own; `inferd.cache.adapters` runs it in a child process. An up-to-date binary whose converter is
missing or from another source gets the converter alone (the sdist fetched and unpacked, nothing
compiled).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_PIN = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# Keep the stores that fill AMX tile configurations (see above); harmless elsewhere.
KEEP_STORES = "-fno-tree-dse -fno-dse"
CMAKE_FLAGS = [
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
    f"-DCMAKE_C_FLAGS={KEEP_STORES}",
    f"-DCMAKE_CXX_FLAGS={KEEP_STORES}",
]
# For images that run on other machines: no -march=native, x86-64-v3's vector extensions
# (AVX2, FMA, F16C; every x86 server CPU since 2015) instead. Slower where AMX or AVX-512 exist.
PORTABLE = [
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
]


def _step(message: str) -> None:
    print(f"[llama-server] {message}", flush=True)


def _run(cmd: list[str], log: Path) -> None:
    with log.open("ab") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        sys.exit(f"[llama-server] {' '.join(cmd[:3])} ... failed:\n" + "\n".join(tail))


def _fetch_sdist(dest: Path) -> None:
    """The sdist file itself, through the package index (verified against its sha256). Not `pip
    download`: for an sdist pip prepares its metadata, building the build backend and its
    dependencies from source first (`--no-binary :all:`), minutes where no wheel cache exists."""
    from inferd.cache.fetch import download, file_url
    from inferd.catalog.schema import Wheel
    from inferd.config import load_settings
    from inferd.errors import InferdError

    package, version = SDIST_PIN.split("==")
    sdist = Wheel(package=package, version=version, filename=SDIST, sha256=SDIST_SHA256)
    try:
        download(file_url(load_settings().pypi_index_url, sdist), dest, SDIST_SHA256)
    except InferdError as exc:
        sys.exit(f"[llama-server] {exc.message}")


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract with the "data" filter where Python has it (3.11.4+); on older Pythons (Debian
    12's 3.11.2, inside images) refuse links and paths leaving `dest` ourselves."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if member.issym() or member.islnk() or not target.is_relative_to(root):
            sys.exit(f"[llama-server] unsafe member in the sdist: {member.name}")
    tar.extractall(dest)  # noqa: S202 - every member checked above


TARGETS = ("llama-server", "llama-quantize")
STAMP = "llama-server.json"
# What the adapter conversion needs from the source tree (relative paths), and its stamp.
CONVERTER_FILES = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion", "gguf-py")
CONVERTER_STAMP = "converter.json"
CONVERTER_SCRIPT = "convert_lora_to_gguf.py"


def converter_dir(prefix: Path) -> Path:
    """Where the build keeps llama.cpp's LoRA converter for an install under `prefix`."""
    return prefix / "share" / "inferd" / "llama.cpp"


def find_converter() -> Path | None:
    """llama.cpp's `convert_lora_to_gguf.py` as the build kept it for this Python's install."""
    script = converter_dir(Path(sys.prefix)) / CONVERTER_SCRIPT
    return script if script.is_file() else None


def _converter_current(prefix: Path, record: dict[str, object]) -> bool:
    folder = converter_dir(prefix)
    if not all((folder / name).exists() for name in CONVERTER_FILES):
        return False
    return read_stamp_file(folder / CONVERTER_STAMP) == record


def _install_converter(source: Path, prefix: Path, record: dict[str, object]) -> None:
    """Copy the converter and what it imports out of `source`, replacing any older copy."""
    folder = converter_dir(prefix)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in CONVERTER_FILES:
        item = source / name
        if item.is_dir():
            shutil.copytree(item, staging / name, ignore=shutil.ignore_patterns("tests"))
        else:
            shutil.copy2(item, staging / name)
    shutil.copy2(source / "LICENSE", staging / "LICENSE")
    (staging / CONVERTER_STAMP).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    _step(f"kept llama.cpp's LoRA converter in {folder}")


def read_stamp(bindir: Path) -> dict[str, object] | None:
    """What the binaries in `bindir` were built from, as `build` recorded it; None when there is
    no stamp (a llama-server from elsewhere) or it is not one."""
    return read_stamp_file(bindir / STAMP)


def read_stamp_file(path: Path) -> dict[str, object] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def flags(portable: bool, cuda_archs: str | None = None) -> list[str]:
    chosen = CMAKE_FLAGS
    if portable:
        chosen = [f for f in CMAKE_FLAGS if not f.startswith("-DGGML_NATIVE")] + PORTABLE
    if cuda_archs:
        # Only the GPUs' own architectures: each one more compiles every CUDA kernel again.
        chosen = [*chosen, "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs}"]
    return chosen


def find_nvcc() -> str | None:
    """CUDA's compiler on PATH, or in the toolkit's usual place."""
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def gpu_architectures() -> str | None:
    """The visible NVIDIA GPUs' compute capabilities as CMake wants them ("90", "80;90"), read by
    inferd's own hardware detection (NVML, else nvidia-smi); None without a GPU."""
    from inferd.catalog import hardware

    caps = {f"{g.compute_capability[0]}{g.compute_capability[1]}" for g in hardware.detect().gpus}
    return ";".join(sorted(caps, key=int)) if caps else None


ARCHS = re.compile(r"^\d+[a-z]?(;\d+[a-z]?)*$")


def cuda_choice(mode: str, archs: str | None) -> str | None:
    """The CUDA architectures to build for, or None for a CPU-only build."""
    if mode == "off":
        return None
    if archs is not None and not ARCHS.match(archs):
        sys.exit(f"[llama-server] --cuda-arch {archs}: CMake's form is wanted, e.g. 90 or '80;90'")
    nvcc = find_nvcc()
    if mode == "auto" and nvcc is None:
        return None
    archs = archs or gpu_architectures()
    if mode == "auto":
        return archs
    if nvcc is None:
        sys.exit("[llama-server] --cuda on: CUDA's compiler (nvcc) is not installed")
    if archs is None:
        sys.exit("[llama-server] --cuda on: no GPU found; name the targets with --cuda-arch 90")
    return archs


def build(
    prefix: Path,
    jobs: int,
    portable: bool = False,
    cuda_archs: str | None = None,
    source_dir: Path | None = None,
) -> Path:
    bindir = prefix / "bin"
    target = bindir / "llama-server"
    stamp = bindir / STAMP
    cmake_flags = flags(portable, cuda_archs)
    record: dict[str, object] = {
        "source": str(source_dir) if source_dir else SDIST,
        "sha256": None if source_dir else SDIST_SHA256,
        "flags": " ".join(cmake_flags),
        "targets": list(TARGETS),
    }
    if cuda_archs:  # (absent from CPU builds' stamps, so those written before stay valid)
        record["cuda"] = cuda_archs
    converter_record = {"source": record["source"], "sha256": record["sha256"]}
    built = all((bindir / name).is_file() for name in TARGETS)
    if built and read_stamp(bindir) == record:
        if not _converter_current(prefix, converter_record):
            with tempfile.TemporaryDirectory(prefix="llama-source-") as tmp:
                _install_converter(_source(Path(tmp), source_dir), prefix, converter_record)
        _step(f"up to date: {target}")
        return target
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llama-build-") as tmp:
        work = Path(tmp)
        log = work / "build.log"
        source = _source(work, source_dir)
        _step(f"configuring ({source.name}{', CUDA ' + cuda_archs if cuda_archs else ''})")
        # nvcc by path: it need not be on PATH (the toolkit's own folder is enough).
        compiler = [f"-DCMAKE_CUDA_COMPILER={find_nvcc()}"] if cuda_archs else []
        _run(["cmake", "-S", str(source), "-B", str(work / "build"), *cmake_flags, *compiler],
             log)  # fmt: skip
        _step(f"compiling {' and '.join(TARGETS)} with {jobs} jobs (a few minutes)")
        _run(
            ["cmake", "--build", str(work / "build"), "--target", *TARGETS, "-j", str(jobs)],
            log,
        )
        bindir.mkdir(parents=True, exist_ok=True)
        for name in TARGETS:
            shutil.copy2(work / "build" / "bin" / name, bindir / name)
        shutil.copy2(source / "LICENSE", bindir / "llama-server.LICENSE")
        _install_converter(source, prefix, converter_record)
    stamp.write_text(json.dumps(record, indent=2) + "\n")
    _step(f"built {target} in {time.monotonic() - started:.0f} s")
    return target


def _source(work: Path, source_dir: Path | None) -> Path:
    """The llama.cpp source tree: `source_dir`, or the pinned sdist fetched and unpacked."""
    if source_dir is not None:
        return source_dir
    _step(f"fetching the llama.cpp source ({SDIST_PIN} sdist)")
    sdist = work / SDIST
    _fetch_sdist(sdist)
    with tarfile.open(sdist) as tar:
        _extract(tar, work)
    return work / SDIST.removesuffix(".tar.gz") / "vendor" / "llama.cpp"


def main() -> None:
    parser = argparse.ArgumentParser(description="Build llama.cpp's llama-server from source.")
    parser.add_argument(
        "--prefix",
        type=Path,
        default=Path(sys.prefix),
        help="install into PREFIX/bin (default: this Python's environment)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--portable", action="store_true", help="for other machines (x86-64-v3, not native)"
    )
    parser.add_argument(
        "--cuda",
        choices=("auto", "on", "off"),
        default="auto",
        help="ggml's CUDA backend: auto = when nvcc and an NVIDIA GPU are both here",
    )
    parser.add_argument(
        "--cuda-arch",
        default=None,
        help="CUDA architectures, e.g. 90 or '80;90' (default: the GPUs')",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="a llama.cpp source tree (default: the pinned sdist)",
    )
    args = parser.parse_args()
    # What the build imports, imported now: `make install` runs it beside pip installing vLLM's
    # dependencies into the same environment, which may replace packages these import.
    importlib.import_module("inferd.cache.fetch")
    importlib.import_module("inferd.config")
    importlib.import_module("inferd.catalog.hardware")
    if args.source is not None and not (args.source / "CMakeLists.txt").is_file():
        sys.exit(f"[llama-server] --source {args.source}: not a llama.cpp source tree")
    cuda_archs = cuda_choice(args.cuda, args.cuda_arch)
    source = args.source.resolve() if args.source else None
    if cuda_archs and args.cuda == "auto":
        # CUDA was found, not asked for: if its build fails (headers missing, an architecture
        # this nvcc no longer targets), the CPU build still makes a working install.
        try:
            build(args.prefix, args.jobs, args.portable, cuda_archs, source)
            return
        except SystemExit as exc:
            _step(f"the CUDA build failed ({str(exc.code).splitlines()[0]}); building for CPU")
            cuda_archs = None
    build(args.prefix, args.jobs, args.portable, cuda_archs, source)


if __name__ == "__main__":
    main()
