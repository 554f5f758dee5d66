"""Kubernetes manifests of a run, rendered from the same config the user runs locally.

`render(config)` returns the objects `kubectl apply` needs, by file:

    namespace.yaml      the Namespace
    secret.yaml         the Ray auth token (deploy.k8s.ray_auth: token) and the Redis password with
                        the server's config file that sets it (dataplane.backend: redis)
    configmap.yaml      the run config, adjusted for the cluster (output_dir on the shared volume,
                        the in-cluster Redis and its password from the environment)
    storage.yaml        a ReadWriteMany PersistentVolumeClaim for run directories: the driver, the
                        store and the trainer write parts of each checkpoint from different pods
    networkpolicy.yaml  only the run's own pods and the KubeRay operator reach the run's pods
    redis.yaml          (dataplane.backend: redis) a headless Service, a StatefulSet with AOF on its
                        own PersistentVolumeClaim, and a PodDisruptionBudget
    rayjob.yaml         a KubeRay RayJob: a Ray cluster that runs `asyncflow run` once, then goes
    raycluster.yaml     or a long-lived KubeRay RayCluster to `asyncflow submit` runs to

Both Ray variants share one cluster spec: a head group and the worker groups of
`deploy.k8s` (resources, node selectors, the CUDA image and a GPU toleration for groups
with GPUs), token authentication, and optionally GCS fault tolerance on the run's Redis.
Every pod passes the Pod Security Standards' "restricted" profile: a fixed non-root user, no
capabilities, RuntimeDefault seccomp, a read-only root filesystem with emptyDirs where Ray
writes. No secret value appears outside secret.yaml. This module only builds dicts; it knows
nothing about Ray or the cluster.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import yaml

from asyncflow.config import AsyncFlowConfig, parse_config
from asyncflow.config.deploy import K8sConfig, PodConfig, WorkerGroupConfig, k8s_name
from asyncflow.errors import ConfigError

CONFIG_DIR = "/etc/asyncflow"
# Not REDIS_PASSWORD: KubeRay sets that one on the head for GCS fault tolerance and refuses a
# head pod that already has it.
PASSWORD_ENV = "ASYNCFLOW_REDIS_PASSWORD"
REDIS_CONF = "/etc/redis"  # the Secret's redis.conf (`requirepass`), so the password is on no command line
DASHBOARD_PORT = 8265
ORDER = ("namespace", "secret", "configmap", "storage", "networkpolicy", "redis", "rayjob", "raycluster")


def object_name(config: AsyncFlowConfig) -> str:
    """deploy.k8s.name, or the run name made an RFC 1035 label (`k8s_name`)."""
    return config.deploy.k8s.name or k8s_name(config.run_name)


def render(
    config: AsyncFlowConfig, *, redis_password: str | None = None, ray_token: str | None = None
) -> dict[str, list[dict]]:
    """Every manifest of `config`, by file name (see the module docstring). Passwords and tokens
    not given are made up, fresh on every call."""
    k8s, name = config.deploy.k8s, object_name(config)
    redis = config.dataplane.backend == "redis"
    if k8s.gcs_fault_tolerance and not redis:
        raise ConfigError(
            f"deploy.k8s.gcs_fault_tolerance = true keeps Ray's GCS in the run's Redis, but "
            f"dataplane.backend = {config.dataplane.backend!r} renders no Redis; set dataplane.backend: "
            "redis, or deploy.k8s.gcs_fault_tolerance: false"
        )
    files: dict[str, list[dict]] = {
        "namespace": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": k8s.namespace}}],
        "secret": [],
        "configmap": [config_map(config, name)],
        "storage": [runs_claim(k8s, name)],
    }
    if k8s.network_policy.enabled:
        files["networkpolicy"] = [network_policy(k8s, name)]
    if k8s.ray_auth == "token":
        files["secret"].append(
            secret(k8s, name, "ray-auth", {"auth_token": ray_token or secrets.token_hex(32)})
        )
    if redis:
        files["redis"] = redis_objects(k8s, name)
        files["secret"].append(redis_secret(k8s, name, redis_password or secrets.token_urlsafe(24)))
    spec = cluster_spec(k8s, name, redis)
    job: dict[str, Any] = {
        # The interpreter's module, not a console script that may be missing from PATH.
        "entrypoint": f"python -m asyncflow.cli run {CONFIG_DIR}/config.yaml",
        **runtime_env(config),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": k8s.ttl_s_after_finished,
        "activeDeadlineSeconds": k8s.active_deadline_s,
        "submitterPodTemplate": submitter_template(k8s, name),
        "rayClusterSpec": spec,
    }
    if config.deploy.ray.entrypoint_num_cpus:
        job["entrypointNumCpus"] = config.deploy.ray.entrypoint_num_cpus
    files["rayjob"] = [
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta(k8s, name, "rayjob"), "spec": job}
    ]
    files["raycluster"] = [
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": meta(k8s, name, "raycluster"),
            "spec": spec,
        }
    ]
    return {f"{key}.yaml": files[key] for key in ORDER if files.get(key)}


def write(files: dict[str, list[dict]], directory: str | Path, header: str = "") -> None:
    """The rendered files into `directory`; secret.yaml readable by its owner only (0600)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for file, docs in files.items():
        path = out / file
        mode = 0o600 if file == "secret.yaml" else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.fchmod(fd, mode)  # also when the file was already there with a wider mode
        with os.fdopen(fd, "w") as f:
            f.write(header + dump(docs))


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


def secret(k8s: K8sConfig, name: str, component: str, data: dict[str, str]) -> dict:
    """The Secret `<name>-<component>`: the only object a secret value is written into."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta(k8s, name, component, f"-{component}"),
        "type": "Opaque",
        "stringData": data,
    }


def redis_secret(k8s: K8sConfig, name: str, password: str) -> dict:
    """The password for clients, and the server's config file that requires it."""
    quoted = password.replace("\\", "\\\\").replace('"', '\\"')
    return secret(k8s, name, "redis", {"password": password, "redis.conf": f'requirepass "{quoted}"\n'})


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


def redis_objects(k8s: K8sConfig, name: str) -> list[dict]:
    """A headless Service, a one-pod StatefulSet (AOF on a claim of its own, the password in a
    config file from the Secret) and a PodDisruptionBudget that keeps drains from evicting it."""
    r, full = k8s.redis, f"{name}-redis"
    select = labels(name, "redis")
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(k8s, name, "redis", "-redis"),
        "spec": {"clusterIP": "None", "selector": select, "ports": [{"name": "redis", "port": 6379}]},
    }
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
        "ports": [{"name": "redis", "containerPort": 6379}],
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


def network_policy(k8s: K8sConfig, name: str) -> dict:
    """Ingress to the run's pods from the run's pods, the KubeRay operator (the dashboard only)
    and deploy.k8s.network_policy.client_labels; egress stays open (pip, model downloads)."""
    np = k8s.network_policy
    run = {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": name}}}
    peers = [run, *({"podSelector": {"matchLabels": dict(c)}} for c in np.client_labels)]
    operator = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": np.operator_namespace}},
        "podSelector": {"matchLabels": dict(np.operator_labels)},
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta(k8s, name, "network", ""),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/instance": name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": peers},
                {"from": [operator], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
            ],
        },
    }


def resources(cpu: str, memory: str, gpus: int) -> dict:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def scratch(k8s: K8sConfig) -> tuple[list[dict], list[dict]]:
    """emptyDir volumes and mounts for where Ray writes: the root filesystem is read-only."""
    volumes: list[dict] = [{"name": "shm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "shm", "mountPath": "/dev/shm"}]
    for i, path in enumerate(k8s.writable_dirs):
        volumes.append({"name": f"scratch-{i}", "emptyDir": {}})
        mounts.append({"name": f"scratch-{i}", "mountPath": path})
    return volumes, mounts


def pod_template(k8s: K8sConfig, name: str, pod: PodConfig, container: str, redis: bool, ports: list) -> dict:
    """A Ray pod: the image for its kind, resources, the config, the shared run volume, scratch."""
    volumes, mounts = scratch(k8s)
    spec: dict[str, Any] = {
        "securityContext": pod_security(k8s.run_as_user, k8s.run_as_group),
        "containers": [
            {
                "name": container,
                "image": k8s.gpu_image if pod.gpus else k8s.image,
                "imagePullPolicy": k8s.image_pull_policy,
                **({"ports": ports} if ports else {}),
                **({"env": [password_env(name)]} if redis else {}),
                "resources": resources(pod.cpu, pod.memory, pod.gpus),
                "securityContext": container_security(),
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "runs", "mountPath": k8s.runs_mount},
                    *mounts,
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": f"{name}-config"}},
            {"name": "runs", "persistentVolumeClaim": {"claimName": f"{name}-runs"}},
            *volumes,
        ],
    }
    if pod.node_selector:
        spec["nodeSelector"] = dict(pod.node_selector)
    if pod.gpus:  # GPU node pools are usually tainted so that only GPU pods land there
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": labels(name, container)}, "spec": spec}


def submitter_template(k8s: K8sConfig, name: str) -> dict:
    """The RayJob's submitter pod (KubeRay fills in its `ray job submit` command and the token):
    restricted like the others, and labelled as the run's so the NetworkPolicy admits it."""
    volumes, mounts = scratch(k8s)
    container = {
        "name": "ray-job-submitter",
        "image": k8s.image,
        "imagePullPolicy": k8s.image_pull_policy,
        "resources": resources("500m", "1Gi", 0),
        "securityContext": container_security(),
        "volumeMounts": mounts,
    }
    spec = {
        "restartPolicy": "Never",
        "securityContext": pod_security(k8s.run_as_user, k8s.run_as_group),
        "containers": [container],
        "volumes": volumes,
    }
    return {"metadata": {"labels": labels(name, "ray-submitter")}, "spec": spec}


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
        {"name": "dashboard", "containerPort": DASHBOARD_PORT},
        {"name": "client", "containerPort": 10001},
    ]
    spec: dict[str, Any] = {
        "rayVersion": k8s.ray_version,
        "enableInTreeAutoscaling": k8s.autoscaling,
        # KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN (from this Secret) on every Ray container.
        "authOptions": {
            "mode": k8s.ray_auth,
            **({"secretName": f"{name}-ray-auth"} if k8s.ray_auth == "token" else {}),
        },
    }
    if k8s.gcs_fault_tolerance:  # KubeRay sets the head's REDIS_PASSWORD from the ref: never set it here
        spec["gcsFaultToleranceOptions"] = {
            "redisAddress": f"{name}-redis.{k8s.namespace}.svc.cluster.local:6379",
            "redisPassword": {"valueFrom": {"secretKeyRef": {"name": f"{name}-redis", "key": "password"}}},
        }
    if k8s.autoscaling:  # the autoscaler sidecar KubeRay adds to the head, restricted like the rest
        spec["autoscalerOptions"] = {"securityContext": container_security()}
    spec["headGroupSpec"] = {
        # Every pod must reach the dashboard (the submitter, the operator); the token and the
        # NetworkPolicy decide who gets in.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": str(k8s.head.ray_cpus)},
        "template": pod_template(k8s, name, k8s.head, "ray-head", redis, ports),
    }
    spec["workerGroupSpecs"] = [worker_group(k8s, name, g, redis) for g in k8s.worker_groups]
    return spec
