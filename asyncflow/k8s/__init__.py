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

import math
import os
import secrets
from pathlib import Path
from typing import Any

import yaml

from asyncflow.config import AsyncFlowConfig, parse_config
from asyncflow.config.deploy import K8sConfig, k8s_name
from asyncflow.errors import ConfigError
from asyncflow.k8s.cluster import check_capacity, cluster_spec, submitter_template
from asyncflow.k8s.objects import CONFIG_DIR, DASHBOARD_PORT, PASSWORD_ENV, meta, password_env, secret
from asyncflow.k8s.redis_store import REDIS_PORT, redis_address, redis_objects, redis_secret

__all__ = ["PASSWORD_ENV", "REDIS_PORT", "dump", "object_name", "password_env", "render", "write"]

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
    check_capacity(config)
    files: dict[str, list[dict]] = {
        "namespace": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": k8s.namespace}}],
        "secret": [],
        "configmap": [config_map(config, name)],
        "storage": [runs_claim(k8s, name)],
    }
    if k8s.network_policy.enabled:
        files["networkpolicy"] = [network_policy(k8s, name, config.logging.prometheus_port)]
    if k8s.ray_auth == "token":
        files["secret"].append(
            secret(k8s, name, "ray-auth", {"auth_token": ray_token or secrets.token_hex(32)})
        )
    if redis:
        files["redis"] = redis_objects(k8s, name)
        files["secret"].append(redis_secret(k8s, name, redis_password or secrets.token_urlsafe(24)))
    spec = cluster_spec(k8s, name, redis, config.logging.prometheus_port)
    # SIGTERM (job stop, eviction, drain) checkpoints within sigterm_grace_s: the driver's pod and
    # Ray's job stop both wait longer than that before they kill.
    grace = math.ceil(config.sigterm_grace_s)
    spec["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSeconds"] = grace + 10
    job: dict[str, Any] = {
        # The interpreter's module, not a console script that may be missing from PATH; a retry or
        # a re-apply continues the run from its last checkpoint.
        "entrypoint": f"python -m asyncflow.cli run {CONFIG_DIR}/config.yaml --resume-if-exists",
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


def cluster_config(config: AsyncFlowConfig, name: str) -> dict:
    """The run config as written, with what differs on the cluster (the `deploy` section stays out)."""
    k8s = config.deploy.k8s
    data = config.model_dump(mode="json", exclude_unset=True, exclude={"deploy"})
    data["output_dir"] = k8s.runs_mount
    if config.logging.prometheus_port:  # the driver runs on the head pod: Prometheus scrapes it there
        data.setdefault("logging", {})["prometheus_host"] = "0.0.0.0"
    if config.dataplane.backend == "memory":  # workers on other pods reach the store's actors
        data.setdefault("dataplane", {}).setdefault("listen", "node")
    if config.dataplane.backend == "redis":
        redis = data.setdefault("dataplane", {}).setdefault("redis", {})
        redis["url"] = f"redis://{redis_address(k8s, name)}/0"
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
    # `jobs stop` sends SIGTERM, then SIGKILL after this many seconds: room for the final checkpoint
    stop_wait = {"RAY_JOB_STOP_WAIT_TIME_S": str(math.ceil(config.sigterm_grace_s) + 5)}
    env["env_vars"] = {**stop_wait, **config.deploy.ray.env_vars}
    return {"runtimeEnvYAML": yaml.safe_dump(env, sort_keys=False)}


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


def network_policy(k8s: K8sConfig, name: str, metrics_port: int = 0) -> dict:
    """Ingress to the run's pods from the run's pods, the KubeRay operator (the dashboard only),
    deploy.k8s.network_policy.client_labels and, with a metrics port, the scrape namespace (that
    port only); egress stays open (pip, model downloads)."""
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
                *([scrape(np.scrape_namespace, metrics_port)] if metrics_port else []),
            ],
        },
    }


def scrape(namespace: str, port: int) -> dict:
    """Prometheus's pods (any in `namespace`) may reach the /metrics port, nothing else."""
    where = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}
    return {"from": [where], "ports": [{"protocol": "TCP", "port": port}]}
