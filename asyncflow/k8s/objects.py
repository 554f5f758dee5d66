"""The pieces every rendered manifest shares: metadata and labels, Secrets and the variables
that read them, resources, and the securityContexts of the Pod Security Standards' restricted
profile. Plain dicts; nothing here knows which object it ends up in.
"""

from __future__ import annotations

from typing import Any

from asyncflow.config.deploy import K8sConfig

CONFIG_DIR = "/etc/asyncflow"
# Not REDIS_PASSWORD: KubeRay sets that one on the head for GCS fault tolerance and refuses a
# head pod that already has it.
PASSWORD_ENV = "ASYNCFLOW_REDIS_PASSWORD"
DASHBOARD_PORT = 8265


def meta(k8s: K8sConfig, name: str, component: str, suffix: str = "") -> dict:
    """Metadata of the object `<name><suffix>` of the run `name`."""
    return {"name": name + suffix, "namespace": k8s.namespace, "labels": labels(name, component)}


def labels(name: str, component: str) -> dict:
    return {
        "app.kubernetes.io/name": "asyncflow",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
    }


def secret(k8s: K8sConfig, name: str, component: str, data: dict[str, str]) -> dict:
    """The Secret `<name>-<component>`: the only object a secret value is written into."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta(k8s, name, component, f"-{component}"),
        "type": "Opaque",
        "stringData": data,
    }


def password_env(name: str, variable: str = PASSWORD_ENV) -> dict:
    return {"name": variable, "valueFrom": {"secretKeyRef": {"name": f"{name}-redis", "key": "password"}}}


def pod_security(user: int, group: int) -> dict:
    """Pod-level securityContext of the Pod Security Standards' restricted profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": user,
        "runAsGroup": group,
        "fsGroup": group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def resources(cpu: str, memory: str, gpus: int) -> dict:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}
