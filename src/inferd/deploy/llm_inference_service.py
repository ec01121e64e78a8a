"""KServe's `LLMInferenceService` (`serving.kserve.io/v1alpha2`) running inferd: what `inferd deploy
kserve --llm-inference-service` writes instead of the serverless InferenceService of
`deploy.kserve`.

An LLMInferenceService is KServe's way to Kubernetes' inference gateway: its controller makes the
workload's Deployment from `spec.template` (merged over KServe's own template, whose container is
named `main` and listens on 8000), an InferencePool over those pods, the endpoint picker
(`router.scheduler`) and an HTTPRoute from the Gateway (`router.gateway`, KServe's own when no
Gateway is named). The picker reads the model-server protocol's metrics under their default names
on `/metrics`, which inferd serves (`observability.gateway_metrics`), so KServe's default scheduler
configuration fits as it is.

inferd's container replaces KServe's vLLM command with `inferd serve` and names the model in
inferd's own variables; inferd fetches and verifies it into its cache (the PVC or host folder of
`deploy.k8s`), so KServe's storage initializer is switched off and `model.uri` only records where
the model comes from (`inferd://<catalog id>`; KServe reads nothing from it once the initializer is
off). Probes, drain, resources and the restricted security context are the plain manifests'.
KServe's own TLS between gateway and pods (its `enableLLMInferenceServiceTLS`) is not wired to
inferd's TLS: with it on, the gateway would speak HTTPS to inferd's plain port (docs/deploy.md).
"""

from __future__ import annotations

import copy
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

LLMISVC_PORT = 8000  # KServe's: "the presets we bundle assume 8000 for the main receiver"
ENTRYPOINT = "/opt/inferd/bin/inferd"  # the image's (`deploy.image`)


def _container(spec: DeploySpec) -> dict[str, Any]:
    env = {
        "INFERD_MODEL": spec.model,
        "INFERD_HOST": "0.0.0.0",  # noqa: S104 - the pod's address; KServe's Service fronts it
        "INFERD_PORT": str(LLMISVC_PORT),
        "INFERD_CACHE_PATH": CACHE_MOUNT,
        "INFERD_JSON_LOGS": "true",
        "INFERD_ALLOW_UNAUTHENTICATED": "true",
        "INFERD_DRAIN_TIMEOUT_S": str(spec.drain_timeout_s),
        "HOME": "/tmp",  # noqa: S108 - an emptyDir; the root is read-only
    }
    if spec.profile != "default":
        env["INFERD_PROFILE"] = spec.profile
    return {
        "name": "main",  # the name of KServe's own container, which this one replaces
        "image": spec.image,
        "imagePullPolicy": "Always",
        "command": [ENTRYPOINT],
        "args": ["serve"],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": [{"containerPort": LLMISVC_PORT, "protocol": "TCP"}],
        **probes(spec, LLMISVC_PORT, https=False),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_S}}},
        "resources": resources(spec),
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "cache", "mountPath": CACHE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir
        ],
    }


def llm_inference_service(spec: DeploySpec, gateway: str | None = None) -> dict[str, Any]:
    """The service; `gateway` names a Gateway in the service's namespace (None: KServe's own)."""
    router: dict[str, Any] = {"route": {}, "gateway": {}, "scheduler": {}}
    if gateway:
        router["gateway"] = {"refs": [{"name": gateway, "namespace": spec.namespace}]}
    return {
        "apiVersion": "serving.kserve.io/v1alpha2",
        "kind": "LLMInferenceService",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": dict(spec.labels),
        },
        "spec": {
            # KServe copies `spec.annotations` onto the workload's pods, where policy tools look.
            "annotations": waivers(tuple(WAIVERS)),
            "model": {"uri": f"inferd://{spec.model}", "name": spec.model},
            "replicas": spec.min_replicas,
            "storageInitializer": {"enabled": False},
            "router": router,
            "template": {
                "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": (
                    PRESTOP_S + spec.drain_timeout_s + SHUTDOWN_MARGIN_S
                ),
                "securityContext": copy.deepcopy(POD_SECURITY),
                "containers": [_container(spec)],
                "volumes": [
                    {"name": "tmp", "emptyDir": {}},
                    {"name": "cache", **cache_volume(spec)},
                ],
            },
        },
    }


def network_policy(spec: DeploySpec) -> dict[str, Any]:
    """Only the workload's port is reachable (KServe labels the pods with the service's name)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": dict(spec.labels)},
        "spec": {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": spec.name,
                    "app.kubernetes.io/component": "llminferenceservice-workload",
                }
            },
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": LLMISVC_PORT, "protocol": "TCP"}]}],
        },
    }
