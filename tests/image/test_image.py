"""The container image, built for real and serving a real request inside (`make image-test`).

Two images: a llama.cpp profile (llama-server compiled inside the build) and vLLM's CPU profile
(its PyTorch wheel fetched on the host into the context). Slow (debootstrap, apt, pip, a compile,
vLLM's start: about 25-40 minutes on 2 cores), so `make test` leaves it out; CI checks the
Containerfiles themselves (tests/integration/test_deploy.py).
Needs root, buildah and debootstrap (`apt-get install buildah debootstrap`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferd import __version__

BIN = Path(sys.executable).parent
MODEL = "smollm2-135m-instruct"
PROFILES = ("llamacpp-cpu-q8_0", "vllm-cpu-bf16")
VFS = ("buildah", "--storage-driver", "vfs")
CACHE = Path(os.environ.get("INFERD_TEST_CACHE_PATH", Path.home() / ".cache" / "inferd-tests"))
# Inside the image: start the service, wait for readiness, ask for a completion, print it.
PROBE = r"""
import json, subprocess, time, urllib.request
# The image listens on all addresses and so needs API keys or an explicit opt-out.
proc = subprocess.Popen(["/opt/inferd/bin/inferd", "serve", "--port", "18931",
                         "--allow-unauthenticated"])
for _ in range(1200):  # vLLM compiles its graphs on the first start: minutes
    if proc.poll() is not None:
        raise SystemExit(f"inferd serve exited with {proc.returncode} before it was ready")
    try:
        urllib.request.urlopen("http://127.0.0.1:18931/v1/health/ready", timeout=2)
        break
    except Exception:
        time.sleep(0.5)
else:
    proc.terminate()
    raise SystemExit("inferd serve was not ready after 10 minutes")
body = json.dumps({"model": "smollm2-135m-instruct", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "Say hello."}]}).encode()
req = urllib.request.Request("http://127.0.0.1:18931/v1/chat/completions", body,
                             {"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(req, timeout=120))
import os
sbom = json.load(open("/opt/inferd/share/sbom/sbom.cdx.json"))
print("ANSWER", json.dumps({"uid": os.getuid(), "answer": answer,
                            "sbom_components": len(sbom["components"])}))
proc.terminate()
proc.wait(60)
"""


@pytest.fixture(scope="module", params=PROFILES)
def image(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if shutil.which("buildah") is None or shutil.which("debootstrap") is None:
        pytest.fail("buildah and debootstrap are needed: apt-get install buildah debootstrap")
    profile = request.param
    ctx = tmp_path_factory.mktemp("image") / "ctx"
    env = {**os.environ, "INFERD_CACHE_PATH": str(CACHE)}
    subprocess.run(
        [BIN / "inferd", "deploy", "containerfile", MODEL, "--profile", profile, "--bake-model",
         "--output", str(ctx)],
        check=True, env=env, timeout=1800,
    )  # fmt: skip
    tag = f"localhost/inferd-test-{profile}:{__version__}"
    subprocess.run([BIN / "inferd", "image", "build", str(ctx), "--tag", tag], check=True,
                   timeout=7200)  # fmt: skip
    yield tag
    # vfs keeps full copies: 0.8 GB (llama.cpp) and 4.6 GB (vLLM) a run, removed afterwards.
    subprocess.run([*VFS, "rmi", tag], capture_output=True, check=False)


def test_image_metadata(image: str) -> None:
    info = json.loads(
        subprocess.run(
            [*VFS, "inspect", "--type", "image", image], capture_output=True, text=True, check=True
        ).stdout
    )
    config = info["Docker"]["config"]
    assert config["User"] == "1000:1000"
    assert "/v1/health/ready" in " ".join(config["Healthcheck"]["Test"])
    labels = config["Labels"]
    profile = labels["dev.inferd.profile"]
    assert labels["dev.inferd.model"] == MODEL and profile in PROFILES and profile in image
    assert labels["dev.inferd.engine"] == profile.split("-")[0]
    assert labels["org.opencontainers.image.version"] == __version__
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["INFERD_CACHE_PATH"] == "/cache" and env["INFERD_OFFLINE"] == "true"
    assert labels["dev.inferd.sbom"] == "/opt/inferd/share/sbom/sbom.cdx.json"


def test_the_image_serves_a_request_as_uid_1000(image: str) -> None:
    container = subprocess.run([*VFS, "from", image], capture_output=True, text=True,
                               check=True).stdout.strip()  # fmt: skip
    try:
        done = subprocess.run(
            [*VFS, "run", "--isolation", "chroot", container, "--",
             "/opt/inferd/bin/python", "-c", PROBE],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
    finally:
        subprocess.run([*VFS, "rm", container], capture_output=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("ANSWER ")), None)
    assert line is not None, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(line.removeprefix("ANSWER "))
    assert result["sbom_components"] > 10  # the SBOM made in the build, of this environment
    assert result["uid"] == 1000
    choice = result["answer"]["choices"][0]
    assert choice["message"]["content"] and result["answer"]["usage"]["completion_tokens"] > 0
