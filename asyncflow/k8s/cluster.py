"""The Ray cluster both KubeRay variants share: a head group, the worker groups of
`deploy.k8s`, token authentication, optionally GCS fault tolerance on the run's Redis, and the
RayJob's submitter pod. Every pod is restricted, with emptyDirs where Ray writes."""

from __future__ import annotations

import json
from typing import Any

from asyncflow.config import AsyncFlowConfig
from asyncflow.config.deploy import K8sConfig, PodConfig, WorkerGroupConfig
from asyncflow.config.resources import asked_by, said
from asyncflow.errors import ConfigError
from asyncflow.k8s.objects import (
    CONFIG_DIR,
    DASHBOARD_PORT,
    container_security,
    labels,
    password_env,
    pod_security,
    resources,
)
from asyncflow.k8s.redis_store import redis_address


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
        # the CLI's --resources takes JSON; KubeRay pastes the value into a shell command line
        "rayStartParams": {"resources": '"' + json.dumps(group.ray_resources).replace('"', '\\"') + '"'}
        if group.ray_resources
        else {},
        "template": pod_template(k8s, name, group, "ray-worker", redis, []),
    }


def cluster_spec(k8s: K8sConfig, name: str, redis: bool, metrics_port: int = 0) -> dict:
    """The RayCluster spec; with a metrics port (logging.prometheus_port) the head, where the
    driver runs, names it and carries the prometheus.io annotations scrapers look for."""
    ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": DASHBOARD_PORT},
        {"name": "client", "containerPort": 10001},
        *([{"name": "metrics", "containerPort": metrics_port}] if metrics_port else []),
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
            "redisAddress": redis_address(k8s, name),
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
    if metrics_port:
        spec["headGroupSpec"]["template"]["metadata"]["annotations"] = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(metrics_port),
            "prometheus.io/path": "/metrics",
        }
    spec["workerGroupSpecs"] = [worker_group(k8s, name, g, redis) for g in k8s.worker_groups]
    return spec


def check_capacity(config: AsyncFlowConfig) -> None:
    """Refuse worker groups that do not match what the run asks Ray for: too few CPUs, GPUs or
    custom resources for every role's actors (counting `replicas` pods, `max_replicas` with
    autoscaling, and the head's ray_cpus), or GPU pods while no role asks for a GPU (they would
    sit idle, and the run would train on the CPU)."""
    k8s, need = config.deploy.k8s, config.resources_needed()
    pods = {g.name: g.max_replicas if k8s.autoscaling else g.replicas for g in k8s.worker_groups}
    offer = {"CPU": float(k8s.head.ray_cpus)}
    for g in k8s.worker_groups:
        for key, amount in per_pod(g).items():
            offer[key] = offer.get(key, 0.0) + amount * pods[g.name]
    idle = [g.name for g in k8s.worker_groups if g.gpus]
    if idle and not need.get("GPU"):
        raise ConfigError(
            f"deploy.k8s.worker_groups {idle} have GPUs, but no role asks for one: their GPUs would sit "
            "idle while the run trains on the CPU. Give the roles that should use them GPUs "
            "(trainer.num_gpus, rollout.num_gpus), or drop those groups"
        )
    counted = "max_replicas" if k8s.autoscaling else "replicas"
    for key, amount in need.items():
        if key != "memory" and amount > offer.get(key, 0.0) + 1e-9:
            asked = asked_by(config.roles(), key) + (", and the store" if key == "CPU" else "")
            raise ConfigError(
                f"the run asks Ray for {amount:g} {key} in all ({asked}), but deploy.k8s offers "
                f"{offer.get(key, 0.0):g} (the head's ray_cpus and each worker group's pods x {counted}). "
                f"Raise a worker group's {counted} or its pods' {key_field(key)}, or ask for less"
            )
    each_fits_a_pod(config)


def per_pod(group: WorkerGroupConfig) -> dict[str, float]:
    """The Ray resources one pod of a worker group offers."""
    return {"CPU": cores(group.cpu), "GPU": float(group.gpus), **group.ray_resources}


def each_fits_a_pod(config: AsyncFlowConfig) -> None:
    """Refuse an actor, or a placement-group bundle, that no single pod can hold (each lands on
    one node)."""
    k8s = config.deploy.k8s
    pods = [per_pod(g) for g in k8s.worker_groups] + [{"CPU": float(k8s.head.ray_cpus)}]
    asks = [
        (f"one {role} actor", s.bundle(), f"ask for less ({role})") for role, (s, _) in config.roles().items()
    ]
    if config.placement == "colocated":  # split: a rank's bundle is the trainer's ask, checked above
        fix = "ask for less (trainer, rollout), or set placement: split"
        asks += [
            ("placement = 'colocated': a trainer rank and a rollout worker", b, fix) for b in config.bundles()
        ]
    for what, bundle, fix in asks:
        if not any(
            all(pod.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items() if k != "memory") for pod in pods
        ):
            raise ConfigError(
                f"{what} needs {said(bundle)} on one node, but no pod of deploy.k8s offers that much. Raise "
                f"a worker group's cpu or gpus per pod, or {fix}"
            )


def key_field(key: str) -> str:
    return {"CPU": "cpu", "GPU": "gpus"}.get(key, f"ray_resources[{key!r}]")


def cores(quantity: str) -> float:
    """A Kubernetes quantity (deploy.QUANTITY) as a number: "4" -> 4.0, "500m" -> 0.5, "2k" -> 2000."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    units |= {f"{u}i": 1024.0 ** (n + 1) for n, u in enumerate("KMGTPE")}
    suffix = next((u for u in sorted(units, key=len, reverse=True) if quantity.endswith(u)), "")
    return float(quantity[: len(quantity) - len(suffix)]) * units.get(suffix, 1.0)
