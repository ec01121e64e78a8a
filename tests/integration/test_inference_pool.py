"""`inferd deploy k8s --gateway inference-pool` and the chart's `inferencePool.enabled`: the
InferencePool and HTTPRoute validate against the released CRDs (tests/fixtures, Apache-2.0: the
Gateway API Inference Extension v1.5.0 and Gateway API v1.6.1), every core object against the
Kubernetes schemas (kubernetes-validate), all of them pass checkov, the pieces point at each other,
and a real `helm` renders the same objects.
"""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from inferd.deploy import inference_pool
from inferd.deploy.k8s import PORT, DeploySpec, objects
from inferd.observability import gateway_metrics
from tests.integration.test_deploy import (
    CHART,
    HELM,
    INFERD,
    MODEL,
    _checkov,
    _deploy,
    _failed,
    _reason,
    _without_helms_own,
)

FIXTURES = Path(__file__).parents[1] / "fixtures"
POOL_CRD = (
    FIXTURES
    / "gateway-api-inference-extension-v1.5.0"
    / "inference.networking.k8s.io_inferencepools.yaml"
)
ROUTE_CRD = FIXTURES / "gateway-api-v1.6.1" / "gateway.networking.k8s.io_httproutes.yaml.gz"
LLMISVC_CRD = FIXTURES / "kserve-v0.20.0" / "serving.kserve.io_llminferenceservices.yaml.gz"
# Kinds whose schemas come from a CRD here, and those no schema checks offline.
CRD_KINDS = {"InferencePool", "HTTPRoute", "LLMInferenceService"}
UNCHECKED = {"ServiceMonitor"}
WAIVED = {"CKV_K8S_40", "CKV_K8S_43", "CKV_K8S_11", "CKV_K8S_38"}


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the CRD version's openAPIV3Schema, for every served version."""
    schemas = {}
    texts = [POOL_CRD.read_bytes()] + [
        gzip.decompress(p.read_bytes()) for p in (ROUTE_CRD, LLMISVC_CRD)
    ]
    for crd in (yaml.load(text, Loader=yaml.CSafeLoader) for text in texts):
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                schema = version["schema"]["openAPIV3Schema"]
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


SCHEMAS = _crd_schemas()


def validate(doc: dict[str, Any]) -> None:
    if doc["kind"] in CRD_KINDS:
        schema = SCHEMAS[(doc["apiVersion"], doc["kind"])]  # KeyError: a version not served
        jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)
    elif doc["kind"] not in UNCHECKED:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _by(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("pool")
    docs = _deploy(tmp, "k8s", "--gateway", "inference-pool", "--gateway-name", "edge",
                   "--api-keys-secret", "keys")  # fmt: skip
    return tmp / "k8s", docs


def test_every_object_validates_against_its_schema(
    written: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, docs = written
    kinds = [d["kind"] for d in docs]
    assert {"InferencePool", "HTTPRoute", "Role", "RoleBinding", "ConfigMap"} <= set(kinds)
    assert kinds.count("Deployment") == 2 and kinds.count("Service") == 2
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize(
    ("kind", "breaks"),
    [
        ("InferencePool", lambda s: s.pop("endpointPickerRef")),
        ("InferencePool", lambda s: s["targetPorts"][0].update(number=70000)),
        ("InferencePool", lambda s: s.update(appProtocol="grpc")),
        ("HTTPRoute", lambda s: s["rules"][0]["backendRefs"][0].update(weight=-1)),
    ],
)
def test_the_schemas_do_refuse_a_broken_object(
    written: tuple[Path, list[dict[str, Any]]], kind: str, breaks: Any
) -> None:
    """The CRD check can fail: the same objects, broken as the schema forbids, are refused."""
    doc = json.loads(json.dumps(next(d for d in written[1] if d["kind"] == kind)))
    breaks(doc["spec"])
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


def test_the_pieces_point_at_each_other(written: tuple[Path, list[dict[str, Any]]]) -> None:
    docs = _by(written[1])
    name, epp = "smollm2-135m-instruct", "smollm2-135m-instruct-epp"
    pool = docs[("InferencePool", name)]["spec"]
    inferd = docs[("Deployment", name)]["spec"]["template"]
    # The pool selects inferd's pods (and not the picker's) on inferd's port.
    assert pool["selector"]["matchLabels"].items() <= inferd["metadata"]["labels"].items()
    picker = docs[("Deployment", epp)]["spec"]["template"]
    assert not pool["selector"]["matchLabels"].items() <= picker["metadata"]["labels"].items()
    [port] = inferd["spec"]["containers"][0]["ports"]
    assert pool["targetPorts"] == [{"number": port["containerPort"]}] == [{"number": PORT}]
    # The pool names the picker's Service and its ext-proc port; the Service selects the picker.
    service = docs[("Service", epp)]["spec"]
    ref = pool["endpointPickerRef"]
    assert ref["name"] == epp and ref["port"]["number"] in {p["port"] for p in service["ports"]}
    assert service["selector"].items() <= picker["metadata"]["labels"].items()
    # The picker watches this pool, with a role that lets it, under its own account.
    args = picker["spec"]["containers"][0]["args"]
    assert args[args.index("--pool-name") + 1] == name
    assert args[args.index("--pool-namespace") + 1] == "inferd"
    binding = docs[("RoleBinding", epp)]
    assert binding["subjects"][0]["name"] == picker["spec"]["serviceAccountName"] == epp
    rules = docs[("Role", binding["roleRef"]["name"])]["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted
    # Its plugins read inferd's metrics route, under the names inferd exports.
    volumes = {v["name"]: v for v in picker["spec"]["volumes"]}
    config_map = volumes["plugins-config-volume"]["configMap"]["name"]
    plugins = yaml.safe_load(docs[("ConfigMap", config_map)]["data"]["default-plugins.yaml"])
    assert args[args.index("--config-file") + 1] == "/config/default-plugins.yaml"
    by_type = {p["type"]: p.get("parameters") for p in plugins["plugins"]}
    assert by_type["metrics-data-source"]["path"] == "/v1/metrics"
    [engine] = by_type["core-metrics-extractor"]["engineConfigs"]
    assert by_type["core-metrics-extractor"]["defaultEngine"] == engine["name"]
    assert [engine[k] for k in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec",
            "loraSpec", "cacheInfoSpec")] == list(gateway_metrics.PROTOCOL)  # fmt: skip
    # The route goes from the named Gateway to the pool.
    route = docs[("HTTPRoute", name)]["spec"]
    assert route["parentRefs"][0]["name"] == "edge"
    assert route["rules"][0]["backendRefs"][0] == {
        "group": "inference.networking.k8s.io", "kind": "InferencePool", "name": name}  # fmt: skip
    # The HPA keeps scaling inferd on its queue.
    assert ("HorizontalPodAutoscaler", name) in docs


def test_the_objects_pass_checkov(written: tuple[Path, list[dict[str, Any]]]) -> None:
    report = _checkov(written[0], "kubernetes")
    assert _failed(report) == []
    skipped = {c["check_id"]: _reason(c) for c in report["results"]["skipped_checks"]}
    assert set(skipped) <= WAIVED and all(skipped.values())


def _render(*sets: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HELM, "template", "smollm2-135m-instruct", str(CHART), "--namespace", "inferd",
         "--api-versions", "monitoring.coreos.com/v1", "--set", "inferencePool.enabled=true",
         *sets],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_chart_renders_the_same_objects(tmp_path: Path) -> None:
    done = _render("--set-string", "inferencePool.gatewayName=edge")
    assert done.returncode == 0, done.stderr
    rendered = _by([d for d in yaml.safe_load_all(done.stdout) if d])
    spec = DeploySpec(name="smollm2-135m-instruct", model=MODEL, image="inferd:0.1.0")
    ours = _by(objects(spec) + inference_pool.objects(spec, inference_pool.Gateway("edge")))
    assert set(rendered) == set(ours)
    for key, doc in ours.items():
        assert _without_helms_own(rendered[key]) == doc, key
    # The chart's own copy passes the policies too (checkov's helm runner renders defaults only).
    (tmp_path / "chart.yaml").write_text(done.stdout)
    report = _checkov(tmp_path, "kubernetes")
    assert _failed(report) == []
    skipped = {c["check_id"] for c in report["results"]["skipped_checks"]}
    assert skipped <= WAIVED | {"CKV_K8S_21"}


def test_the_chart_refuses_tls_with_the_gateway() -> None:
    done = _render("--set-string", "tlsSecret=tls")
    assert done.returncode != 0 and "terminate TLS at the Gateway" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gateway", "inference-pool", "--tls-secret", "tls"], "--tls-secret is not supported"),
        (["--gateway", "inference-pool", "--gateway-name", "Bad_Name"], "--gateway-name"),
        (["--gateway", "istio"], "--gateway"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    done = subprocess.run(
        [INFERD, "deploy", "k8s", MODEL, "--output", str(tmp_path / "out"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_kserve_llm_inference_service(tmp_path: Path) -> None:
    docs = _by(_deploy(tmp_path, "kserve", "--llm-inference-service", "--gateway-name", "edge"))
    name = "smollm2-135m-instruct"
    assert [k for k, _ in docs] == ["PersistentVolumeClaim", "LLMInferenceService", "NetworkPolicy"]
    for doc in docs.values():
        validate(doc)  # the LLMInferenceService against KServe v0.20.0's CRD (v1alpha2)
    service = docs[("LLMInferenceService", name)]["spec"]
    assert service["storageInitializer"] == {"enabled": False}  # inferd fetches the model itself
    assert service["router"]["gateway"] == {"refs": [{"name": "edge", "namespace": "inferd"}]}
    [container] = service["template"]["containers"]
    # KServe's own container is `main` on port 8000; inferd's replaces its command.
    assert container["name"] == "main" and container["command"] == ["/opt/inferd/bin/inferd"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["INFERD_MODEL"] == MODEL and env["INFERD_PORT"] == "8000"
    # The pod KServe makes from the template, with the labels it gives the workload's pods
    # (`singleNodeLabels` in KServe's controller): a valid Pod, passing the policies, which the
    # NetworkPolicy selects.
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "llminferenceservice",
              "app.kubernetes.io/component": "llminferenceservice-workload"}  # fmt: skip
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "inferd",
            "labels": labels,
            "annotations": service["annotations"],
        },
        "spec": service["template"],
    }
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    selector = docs[("NetworkPolicy", name)]["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items()
    (tmp_path / "pod").mkdir()
    (tmp_path / "pod" / "pod.yaml").write_text(yaml.safe_dump(pod))
    policy = yaml.safe_dump(docs[("NetworkPolicy", name)])
    (tmp_path / "pod" / "policy.yaml").write_text(policy)
    assert _failed(_checkov(tmp_path / "pod", "kubernetes")) == []
    # The schema check can fail: without the model's URI, KServe's CRD refuses it.
    broken = json.loads(json.dumps(docs[("LLMInferenceService", name)]))
    del broken["spec"]["model"]["uri"]
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
