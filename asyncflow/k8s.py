"""Kubernetes manifests of a run, rendered from the same config the user runs locally.

`render(config)` returns the objects `kubectl apply` needs, by file:

    namespace.yaml    the Namespace
    configmap.yaml    the run config, adjusted for the cluster (output_dir on the shared volume,
                      the in-cluster Redis and its password from the environment)
    storage.yaml      a ReadWriteMany PersistentVolumeClaim for run directories: the driver, the
                      store and the trainer write parts of each checkpoint from different pods
    redis.yaml        (dataplane.backend: redis) a headless Service and a StatefulSet with AOF on
                      its own PersistentVolumeClaim
    secret.yaml       (dataplane.backend: redis) the Redis password
    rayjob.yaml       a KubeRay RayJob: a Ray cluster that runs `asyncflow run` once, then goes
    raycluster.yaml   or a long-lived KubeRay RayCluster to `asyncflow submit` runs to

Both Ray variants share one cluster spec: a head group and the worker groups of
`deploy.k8s` (resources, node selectors, the CUDA image and a GPU toleration for groups
with GPUs). This module only builds dicts; it knows nothing about Ray or the cluster.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import yaml

from asyncflow.config import AsyncFlowConfig, parse_config
from asyncflow.config.deploy import K8sConfig, PodConfig, WorkerGroupConfig

CONFIG_DIR = "/etc/asyncflow"
PASSWORD_ENV = "REDIS_PASSWORD"
ORDER = ("namespace", "secret", "configmap", "storage", "redis", "rayjob", "raycluster")


def object_name(config: AsyncFlowConfig) -> str:
    """deploy.k8s.name, or the run name as a DNS label."""
    if config.deploy.k8s.name:
        return config.deploy.k8s.name
    return re.sub(r"[^a-z0-9-]", "-", config.run_name.lower()).strip("-")[:40] or "asyncflow"


def render(config: AsyncFlowConfig, *, redis_password: str | None = None) -> dict[str, list[dict]]:
    """Every manifest of `config`, by file name (see the module docstring)."""
    k8s, name = config.deploy.k8s, object_name(config)
    redis = config.dataplane.backend == "redis"
    files: dict[str, list[dict]] = {
        "namespace": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": k8s.namespace}}],
        "configmap": [config_map(config, name)],
        "storage": [runs_claim(k8s, name)],
    }
    if redis:
        files["redis"] = redis_objects(k8s, name)
        files["secret"] = [redis_secret(k8s, name, redis_password or secrets.token_urlsafe(24))]
    spec = cluster_spec(k8s, name, redis)
    files["rayjob"] = [
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": meta(k8s, name, "rayjob"),
            "spec": {
                "entrypoint": f"asyncflow run {CONFIG_DIR}/config.yaml",
                **runtime_env(config),
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": k8s.ttl_s_after_finished,
                "rayClusterSpec": spec,
            },
        }
    ]
    files["raycluster"] = [
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": meta(k8s, name, "raycluster"),
            "spec": spec,
        }
    ]
    return {f"{key}.yaml": files[key] for key in ORDER if key in files}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the config in the ConfigMap) as literal blocks, readable in a diff;
    no anchors for dicts used twice (the label sets)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def dump(docs: list[dict]) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False) for d in docs)


def meta(k8s: K8sConfig, name: str, component: str, suffix: str = "") -> dict:
    """Metadata of the object `<name><suffix>` of the run `name`."""
    return {"name": name + suffix, "namespace": k8s.namespace, "labels": labels(name, component)}


def labels(name: str, component: str) -> dict:
    return {
        "app.kubernetes.io/name": "asyncflow",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
    }


def cluster_config(config: AsyncFlowConfig, name: str) -> dict:
    """The run config as written, with what differs on the cluster (the `deploy` section stays out)."""
    k8s = config.deploy.k8s
    data = config.model_dump(mode="json", exclude_unset=True, exclude={"deploy"})
    data["output_dir"] = k8s.runs_mount
    if config.dataplane.backend == "memory":  # workers on other pods reach the store's actors
        data.setdefault("dataplane", {}).setdefault("listen", "node")
    if config.dataplane.backend == "redis":
        redis = data.setdefault("dataplane", {}).setdefault("redis", {})
        redis["url"] = f"redis://{name}-redis.{k8s.namespace}.svc.cluster.local:6379/0"
        redis["password_env"] = PASSWORD_ENV
    parse_config(data, source="the cluster's config")  # what the pods will load must load
    return data


def config_map(config: AsyncFlowConfig, name: str) -> dict:
    text = yaml.safe_dump(cluster_config(config, name), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(config.deploy.k8s, name, "config", "-config"),
        "data": {"config.yaml": text},
    }


def runtime_env(config: AsyncFlowConfig) -> dict:
    """deploy.ray's packages and variables, for the job (the code itself is in the image)."""
    env: dict[str, Any] = {}
    if config.deploy.ray.pip:
        env["pip"] = list(config.deploy.ray.pip)
    if config.deploy.ray.env_vars:
        env["env_vars"] = dict(config.deploy.ray.env_vars)
    return {"runtimeEnvYAML": yaml.safe_dump(env, sort_keys=False)} if env else {}


def runs_claim(k8s: K8sConfig, name: str) -> dict:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": k8s.runs_storage}},
    }
    if k8s.runs_storage_class:
        spec["storageClassName"] = k8s.runs_storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta(k8s, name, "runs", "-runs"),
        "spec": spec,
    }


def redis_secret(k8s: K8sConfig, name: str, password: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta(k8s, name, "redis", "-redis"),
        "type": "Opaque",
        "stringData": {"password": password},
    }


def password_env(name: str) -> dict:
    return {"name": PASSWORD_ENV, "valueFrom": {"secretKeyRef": {"name": f"{name}-redis", "key": "password"}}}


def redis_objects(k8s: K8sConfig, name: str) -> list[dict]:
    """A headless Service and a one-pod StatefulSet: AOF on a claim of its own, a password."""
    r, full = k8s.redis, f"{name}-redis"
    select = labels(name, "redis")
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(k8s, name, "redis", "-redis"),
        "spec": {"clusterIP": "None", "selector": select, "ports": [{"name": "redis", "port": 6379}]},
    }
    # $(REDIS_PASSWORD) is expanded by the kubelet from the container's env, never stored in the spec.
    args = ["--appendonly", "yes", "--appendfsync", r.appendfsync, "--dir", "/data", "--save", "",
            "--requirepass", f"$({PASSWORD_ENV})"]  # fmt: skip
    ping = f'redis-cli -a "${PASSWORD_ENV}" --no-auth-warning ping | grep -q PONG'
    container = {
        "name": "redis",
        "image": r.image,
        "imagePullPolicy": k8s.image_pull_policy,
        "command": ["redis-server"],
        "args": args,
        "env": [password_env(name)],
        "ports": [{"name": "redis", "containerPort": 6379}],
        "resources": resources(r.cpu, r.memory, 0),
        "readinessProbe": {"exec": {"command": ["sh", "-c", ping]}, "periodSeconds": 5},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
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
            "template": {"metadata": {"labels": select}, "spec": {"containers": [container]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim}],
        },
    }
    return [service, statefulset]


def resources(cpu: str, memory: str, gpus: int) -> dict:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def pod_template(k8s: K8sConfig, name: str, pod: PodConfig, container: str, redis: bool, ports: list) -> dict:
    """A Ray pod: the image for its kind, resources, the config and the shared run volume."""
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": container,
                "image": k8s.gpu_image if pod.gpus else k8s.image,
                "imagePullPolicy": k8s.image_pull_policy,
                **({"ports": ports} if ports else {}),
                **({"env": [password_env(name)]} if redis else {}),
                "resources": resources(pod.cpu, pod.memory, pod.gpus),
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "runs", "mountPath": k8s.runs_mount},
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": f"{name}-config"}},
            {"name": "runs", "persistentVolumeClaim": {"claimName": f"{name}-runs"}},
        ],
    }
    if pod.node_selector:
        spec["nodeSelector"] = dict(pod.node_selector)
    if pod.gpus:  # GPU node pools are usually tainted so that only GPU pods land there
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": labels(name, container)}, "spec": spec}


def worker_group(k8s: K8sConfig, name: str, group: WorkerGroupConfig, redis: bool) -> dict:
    return {
        "groupName": group.name,
        "replicas": group.replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {},
        "template": pod_template(k8s, name, group, "ray-worker", redis, []),
    }


def cluster_spec(k8s: K8sConfig, name: str, redis: bool) -> dict:
    ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
    ]
    return {
        "rayVersion": k8s.ray_version,
        "enableInTreeAutoscaling": k8s.autoscaling,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": str(k8s.head.ray_cpus)},
            "template": pod_template(k8s, name, k8s.head, "ray-head", redis, ports),
        },
        "workerGroupSpecs": [worker_group(k8s, name, g, redis) for g in k8s.worker_groups],
    }
