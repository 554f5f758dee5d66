"""The Redis store of a run (dataplane.backend: redis): its Secret, a headless Service, a
one-pod StatefulSet with AOF on a claim of its own, and a PodDisruptionBudget."""

from __future__ import annotations

from typing import Any

from asyncflow.config.deploy import K8sConfig
from asyncflow.k8s.objects import (
    container_security,
    labels,
    meta,
    password_env,
    pod_security,
    resources,
    secret,
)

REDIS_PORT = 6379
REDIS_CONF = "/etc/redis"  # the Secret's redis.conf (`requirepass`), so the password is on no command line


def redis_secret(k8s: K8sConfig, name: str, password: str) -> dict:
    """The password for clients, and the server's config file that requires it."""
    quoted = password.replace("\\", "\\\\").replace('"', '\\"')
    return secret(k8s, name, "redis", {"password": password, "redis.conf": f'requirepass "{quoted}"\n'})


def redis_address(k8s: K8sConfig, name: str) -> str:
    """host:port of the run's Redis Service, as pods in the cluster reach it."""
    return f"{name}-redis.{k8s.namespace}.svc.cluster.local:{REDIS_PORT}"


def redis_objects(k8s: K8sConfig, name: str) -> list[dict]:
    """A headless Service, a one-pod StatefulSet (AOF on a claim of its own, the password in a
    config file from the Secret) and a PodDisruptionBudget that keeps drains from evicting it."""
    r, full = k8s.redis, f"{name}-redis"
    select = labels(name, "redis")
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(k8s, name, "redis", "-redis"),
        "spec": {"clusterIP": "None", "selector": select, "ports": [{"name": "redis", "port": REDIS_PORT}]},
    }
    container = _redis_container(k8s, name)
    config = {
        "secretName": full,
        "items": [{"key": "redis.conf", "path": "redis.conf"}],
        "defaultMode": 0o440,
    }
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": r.storage}},
    }
    if r.storage_class:
        claim["storageClassName"] = r.storage_class
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta(k8s, name, "redis", "-redis"),
        "spec": {
            "serviceName": full,
            "replicas": 1,
            "selector": {"matchLabels": select},
            "template": {
                "metadata": {"labels": select},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security(r.run_as_user, r.run_as_group),
                    "containers": [container],
                    "volumes": [{"name": "config", "secret": config}],
                },
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim}],
        },
    }
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(k8s, name, "redis", "-redis"),
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": select}},
    }
    return [service, statefulset, budget]


def _redis_container(k8s: K8sConfig, name: str) -> dict:
    """The redis-server container: AOF on /data, the password from the mounted config file."""
    r = k8s.redis
    args = [f"{REDIS_CONF}/redis.conf", "--appendonly", "yes", "--appendfsync", r.appendfsync,
            "--dir", "/data", "--save", ""]  # fmt: skip
    # redis-cli reads the password from REDISCLI_AUTH: not on its command line either.
    ping = "redis-cli ping | grep -q PONG"
    alive = "redis-cli ping | grep -qE 'PONG|LOADING'"  # replaying a long AOF is not dead
    container = {
        "name": "redis",
        "image": r.image,
        "imagePullPolicy": k8s.image_pull_policy,
        "command": ["redis-server"],
        "args": args,
        "env": [password_env(name, "REDISCLI_AUTH")],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "resources": resources(r.cpu, r.memory, 0),
        "readinessProbe": {"exec": {"command": ["sh", "-c", ping]}, "periodSeconds": 5},
        "livenessProbe": {
            "exec": {"command": ["sh", "-c", alive]},
            "initialDelaySeconds": 30,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "data", "mountPath": "/data"},
            {"name": "config", "mountPath": REDIS_CONF, "readOnly": True},
        ],
    }
    return container
