"""KServe: a ClusterServingRuntime that runs inferd, and an InferenceService using it.

KServe starts the runtime's container for each InferenceService whose model format is `inferd`
and routes to its port 8080. The InferenceService names the model and profile in inferd's own
variables (`INFERD_MODEL`, `INFERD_PROFILE`) rather than a `storageUri`: inferd fetches and
verifies the model into its cache (a PVC here) itself, as it does anywhere else. Probes, drain
time and the restricted security context are the plain manifests' (`deploy.k8s`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from inferd.deploy.k8s import (
    CACHE_MOUNT,
    CONTAINER_SECURITY,
    POD_SECURITY,
    PRESTOP_S,
    SHUTDOWN_MARGIN_S,
    WAIVERS,
    DeploySpec,
    cache_volume,
    probes,
    resources,
    waivers,
)

KSERVE_PORT = 8080


def _container(spec: DeploySpec) -> dict[str, Any]:
    """The runtime's container: generic, the InferenceService names the model (`_model_env`)."""
    return {
        "name": "kserve-container",
        "image": spec.image,
        "imagePullPolicy": "Always",
        "args": ["serve"],
        "env": [
            {"name": "INFERD_HOST", "value": "0.0.0.0"},  # noqa: S104 - the pod's address
            {"name": "INFERD_PORT", "value": str(KSERVE_PORT)},
            {"name": "INFERD_CACHE_PATH", "value": CACHE_MOUNT},
            {"name": "INFERD_JSON_LOGS", "value": "true"},
            {"name": "INFERD_ALLOW_UNAUTHENTICATED", "value": "true"},
            {"name": "INFERD_DRAIN_TIMEOUT_S", "value": str(spec.drain_timeout_s)},
            {"name": "HOME", "value": "/tmp"},  # noqa: S108 - an emptyDir; the root is read-only
        ],
        "ports": [{"containerPort": KSERVE_PORT, "protocol": "TCP"}],
        **probes(spec, KSERVE_PORT, https=False),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_S}}},
        "resources": resources(dataclasses.replace(spec, gpus=0)),  # GPUs: per InferenceService
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "cache", "mountPath": CACHE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir
        ],
    }


def _model_env(spec: DeploySpec) -> list[dict[str, str]]:
    env = [{"name": "INFERD_MODEL", "value": spec.model}]
    if spec.profile != "default":
        env.append({"name": "INFERD_PROFILE", "value": spec.profile})
    return env


def cluster_serving_runtime(spec: DeploySpec) -> dict[str, Any]:
    container = _container(spec)
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ClusterServingRuntime",
        "metadata": {"name": "inferd", "labels": {"app.kubernetes.io/name": "inferd"}},
        "spec": {
            "annotations": {
                "prometheus.kserve.io/port": str(KSERVE_PORT),
                "prometheus.kserve.io/path": "/v1/metrics",
            },
            "supportedModelFormats": [{"name": "inferd", "version": "1", "autoSelect": True}],
            "protocolVersions": ["v1"],
            "containers": [container],
        },
    }


def inference_service(spec: DeploySpec) -> dict[str, Any]:
    predictor: dict[str, Any] = {
        "minReplicas": spec.min_replicas,
        "maxReplicas": spec.max_replicas,
        # KServe's own autoscaler (Knative) scales on requests in flight per pod.
        "scaleMetric": "concurrency",
        "scaleTarget": spec.waiting_per_pod + 1,
        "terminationGracePeriodSeconds": PRESTOP_S + spec.drain_timeout_s + SHUTDOWN_MARGIN_S,
        "automountServiceAccountToken": False,
        "securityContext": copy.deepcopy(POD_SECURITY),
        "model": {
            "modelFormat": {"name": "inferd"},
            "runtime": "inferd",
            "env": _model_env(spec),
            "resources": resources(spec),
        },
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", **cache_volume(spec)},
        ],
    }
    metadata: dict[str, Any] = {
        "name": spec.name,
        "namespace": spec.namespace,
        "labels": dict(spec.labels),
        # KServe copies these onto the predictor's pods, where policy tools look.
        "annotations": waivers(tuple(WAIVERS)),
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": predictor},
    }


def network_policy(spec: DeploySpec) -> dict[str, Any]:
    """Only the predictor's port is reachable (KServe labels its pods with the service's name)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": dict(spec.labels)},
        "spec": {
            "podSelector": {"matchLabels": {"serving.kserve.io/inferenceservice": spec.name}},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": KSERVE_PORT, "protocol": "TCP"}]}],
        },
    }
