"""Kubernetes' inference gateway in front of inferd: what `inferd deploy k8s --gateway
inference-pool` writes beside the plain objects of `deploy.k8s` (and the Helm chart renders with
`inferencePool.enabled`; a test compares the two).

The Gateway API Inference Extension routes each request to one pod of an `InferencePool`
(`inference.networking.k8s.io/v1`), chosen by its endpoint picker (EPP) from the metrics every pod
exports under the model-server protocol's names (`observability.gateway_metrics`). This module
writes, as the extension's release `EPP_RELEASE` ships them (its `config/charts/inferencepool`):
- the `InferencePool` selecting inferd's pods on inferd's port;
- the EPP: its ServiceAccount, a Role and RoleBinding (the union of the release's two Roles:
  watch pods, and the pool and its objectives), the ConfigMap of its plugins (the release's
  default scorers: queue, KV-cache use, prefix cache; the metrics scraped from inferd's
  `/v1/metrics`, with the metric names inferd exports named in `engineConfigs`, which replaced the
  release's deprecated `--*-metric` flags), its Deployment (the release's image, flags, ports,
  probes and resources, in a restricted pod like inferd's), Service and a NetworkPolicy admitting
  only its ports;
- an `HTTPRoute` (Gateway API v1) from a named Gateway to the pool.
The Service and HPA of `deploy.k8s` stay: the HPA keeps scaling on queue depth, the picker
spreads the load over whatever pods there are.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from inferd.deploy.k8s import CONTAINER_SECURITY, PORT, DeploySpec
from inferd.observability import gateway_metrics

EPP_RELEASE = "v1.5.0"
EPP_IMAGE = f"registry.k8s.io/gateway-api-inference-extension/epp:{EPP_RELEASE}"
EXT_PROC_PORT = 9002
HEALTH_PORT = 9003
EPP_METRICS_PORT = 9090
PLUGINS_FILE = "default-plugins.yaml"
# The distroless image's own unprivileged user ("nonroot").
EPP_UID = 65532
# The release's: "this timeout should mirror the longest grace period of the pods in the pool".
EPP_GRACE_S = 130
ROUTE_TIMEOUT = "300s"  # the release's HTTPRoute default

# The release's default plugins, reading inferd's metrics path and names (written as text so the
# Helm chart can carry the same bytes).
PLUGINS = f"""\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
  parameters:
    scheme: http
    path: /v1/metrics
    insecureSkipVerify: true
- type: core-metrics-extractor
  parameters:
    defaultEngine: inferd
    engineConfigs:
    - name: inferd
      queuedRequestsSpec: {gateway_metrics.WAITING}
      runningRequestsSpec: {gateway_metrics.RUNNING}
      kvUsageSpec: {gateway_metrics.KV_USAGE}
      loraSpec: {gateway_metrics.LORA_INFO}
      cacheInfoSpec: {gateway_metrics.CACHE_INFO}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"""

# Checks the picker's objects fail on purpose, with the reason (checkov reads these).
EPP_WAIVERS = {
    "CKV_K8S_43": "the endpoint picker's image is pinned by tag, as its release's manifests pin it",
    "CKV_K8S_11": "no CPU limit, as the release ships it: the picker bursts to the node's CPUs "
    "during scheduling spikes",
    "CKV_K8S_38": "the picker watches the pool and its pods through the Kubernetes API, which "
    "needs the service-account token",
}


@dataclass(frozen=True)
class Gateway:
    """Which Gateway routes to the pool (a Gateway in the service's namespace)."""

    name: str = "inference-gateway"


def epp_name(spec: DeploySpec) -> str:
    return f"{spec.name}-epp"


def _epp_labels(spec: DeploySpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "endpoint-picker",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/version": EPP_RELEASE,
    }


def _epp_selector(spec: DeploySpec) -> dict[str, str]:
    return {"inferencepool": epp_name(spec)}  # the release's selector label


def _meta(spec: DeploySpec, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": spec.namespace, "labels": dict(labels)}


def inference_pool(spec: DeploySpec) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": _meta(spec, spec.name, spec.labels),
        "spec": {
            "targetPorts": [{"number": PORT}],
            "appProtocol": "http",
            "selector": {"matchLabels": dict(spec.selector)},
            "endpointPickerRef": {
                "name": epp_name(spec),
                "port": {"number": EXT_PROC_PORT},
                # Requests still flow, round-robin, while the picker is down.
                "failureMode": "FailOpen",
            },
        },
    }


def http_route(spec: DeploySpec, gateway: Gateway) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": _meta(spec, spec.name, spec.labels),
        "spec": {
            "parentRefs": [
                {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway.name}
            ],
            "rules": [
                {
                    "backendRefs": [
                        {
                            "group": "inference.networking.k8s.io",
                            "kind": "InferencePool",
                            "name": spec.name,
                        }
                    ],
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "timeouts": {"request": ROUTE_TIMEOUT},
                }
            ],
        },
    }


def _rbac(spec: DeploySpec) -> list[dict[str, Any]]:
    name, labels = epp_name(spec), _epp_labels(spec)
    watch = ["get", "watch", "list"]
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(spec, name, labels),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(spec, name, labels),
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": watch},
                {
                    "apiGroups": ["inference.networking.x-k8s.io"],
                    "resources": ["inferenceobjectives", "inferencemodelrewrites"],
                    "verbs": watch,
                },
                {
                    "apiGroups": ["inference.networking.k8s.io"],
                    "resources": ["inferencepools"],
                    "verbs": watch,
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(spec, name, labels),
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": spec.namespace}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        },
    ]


def _epp_container(spec: DeploySpec) -> dict[str, Any]:
    def field_env(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    def probe(period: int) -> dict[str, Any]:
        return {
            "grpc": {"port": HEALTH_PORT, "service": "inference-extension"},
            "periodSeconds": period,
        }

    security = copy.deepcopy(CONTAINER_SECURITY)
    security.update(runAsUser=EPP_UID, runAsGroup=EPP_UID)
    return {
        "name": "epp",
        "image": EPP_IMAGE,
        "imagePullPolicy": "Always",
        "args": [
            *("--pool-name", spec.name, "--pool-namespace", spec.namespace),
            *("--pool-group", "inference.networking.k8s.io", "--zap-encoder", "json"),
            *("--config-file", f"/config/{PLUGINS_FILE}", "--v", "1", "--tracing=false"),
        ],
        "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "16Gi"}},
        "ports": [
            {"name": "grpc", "containerPort": EXT_PROC_PORT},
            {"name": "grpc-health", "containerPort": HEALTH_PORT},
            {"name": "metrics", "containerPort": EPP_METRICS_PORT},
        ],
        "livenessProbe": {**probe(10), "initialDelaySeconds": 5},
        "readinessProbe": probe(2),
        "env": [
            field_env("NAMESPACE", "metadata.namespace"),
            field_env("POD_NAME", "metadata.name"),
        ],
        "securityContext": security,
        "volumeMounts": [
            {"name": "plugins-config-volume", "mountPath": "/config"},
            # Self-signed serving certificates for its metrics port go to the temporary folder.
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir
        ],
    }


def epp_deployment(spec: DeploySpec) -> dict[str, Any]:
    name, labels = epp_name(spec), _epp_labels(spec)
    waived = {
        f"checkov.io/skip{i}": f"{check}={reason}"
        for i, (check, reason) in enumerate(EPP_WAIVERS.items(), 1)
    }
    mode = {"inference.networking.k8s.io/igw-mode": "inferencepool"}  # the release's
    pod_labels = {**_epp_selector(spec), **mode}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {**_meta(spec, name, {**labels, **mode}), "annotations": waived},
        "spec": {
            "replicas": 1,
            # The release's: one active picker (its prefix-cache state lives in memory);
            # Recreate lets the new one take over at once.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": _epp_selector(spec)},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": dict(waived)},
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": True,
                    "terminationGracePeriodSeconds": EPP_GRACE_S,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": EPP_UID,
                        "runAsGroup": EPP_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [_epp_container(spec)],
                    "volumes": [
                        {"name": "plugins-config-volume", "configMap": {"name": name}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def epp_service(spec: DeploySpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(spec, epp_name(spec), _epp_labels(spec)),
        "spec": {
            "type": "ClusterIP",
            "selector": _epp_selector(spec),
            "ports": [
                {"name": "grpc-ext-proc", "protocol": "TCP", "port": EXT_PROC_PORT},
                {"name": "http-metrics", "protocol": "TCP", "port": EPP_METRICS_PORT},
            ],
        },
    }


def epp_network_policy(spec: DeploySpec) -> dict[str, Any]:
    """Only the picker's ports are reachable: ext-proc (from the gateway), health, metrics."""
    ports = (EXT_PROC_PORT, HEALTH_PORT, EPP_METRICS_PORT)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(spec, epp_name(spec), _epp_labels(spec)),
        "spec": {
            "podSelector": {"matchLabels": _epp_selector(spec)},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": p, "protocol": "TCP"} for p in ports]}],
        },
    }


def objects(spec: DeploySpec, gateway: Gateway) -> list[dict[str, Any]]:
    """The gateway's objects, in the order `kubectl apply` wants them (after `deploy.k8s`'s)."""
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(spec, epp_name(spec), _epp_labels(spec)),
        "data": {PLUGINS_FILE: PLUGINS},
    }
    return [
        *_rbac(spec),
        config,
        epp_deployment(spec),
        epp_service(spec),
        epp_network_policy(spec),
        inference_pool(spec),
        http_route(spec, gateway),
    ]
