"""The Ray cluster both KubeRay variants share: a head group, the worker groups of
`deploy.k8s`, token authentication, optionally GCS fault tolerance on the run's Redis, and the
RayJob's submitter pod. Every pod is restricted, with emptyDirs where Ray writes."""

from __future__ import annotations

from typing import Any

from asyncflow.config.deploy import K8sConfig, PodConfig, WorkerGroupConfig
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
        "rayStartParams": {},
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
