"""Config of where a run is deployed (`deploy:` in a run config): Ray job submission and Kubernetes.

A run ignores this section; `asyncflow submit` reads `deploy.ray` (what the job's runtime
environment carries) and `asyncflow render-k8s` reads `deploy.k8s` (the KubeRay cluster,
the Redis StatefulSet, the shared volume for run directories). Only names and numbers here.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from asyncflow.config._base import Section

# Kubernetes resource quantities: "500m", "2", "16Gi", "1.5".
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
# An RFC 1123 label: what namespaces and worker groups may be.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# An RFC 1035 label: what RayJob, RayCluster and Service names must be (they start with a letter).
DNS_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# The longest object-name prefix: KubeRay allows 47 characters for a RayJob (it appends 6 for the
# cluster, and "-serve-svc" must fit in 63); 40 leaves room for "-ray-auth" and the like.
NAME_MAX = 40
LABELS = dict[str, str]
# What `asyncflow submit` never uploads: caches and virtual environments easily exceed Ray's
# 100 MB working-directory limit (a .mypy_cache alone did), run directories and weights too.
EXCLUDES = [".git", ".venv", "venv", "runs", ".bench", "__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache",
            ".pytest_cache", ".hypothesis", "*.egg-info", "*.safetensors", "*.pt"]  # fmt: skip


def k8s_name(run_name: str) -> str:
    """The prefix of every object's name when deploy.k8s.name is unset, from the run name.

    Lowercased; every run of characters other than a-z and 0-9 becomes one '-'; a name that
    does not start with a letter gets 'run-' in front; cut to 40 characters, then stripped of
    '-' at either end. `Sort_Cluster.v2` -> `sort-cluster-v2`, `2024-sweep` -> `run-2024-sweep`.
    """
    name = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-")
    if not name[:1].isalpha():
        name = f"run-{name}"
    return name[:NAME_MAX].strip("-")


class RayJobConfig(Section):
    """What `asyncflow submit` sends with the job besides the working directory."""

    pip: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Extra packages pip-installs into the job's runtime environment (e.g. "
        "'redis[hiredis]>=5.0', a custom reward's library); empty when the cluster's image has "
        "everything. AsyncFlow itself comes from the image (deploy/docker) or the uploaded working "
        "directory: never list a bare 'asyncflow' (PyPI's 'asyncflow' is an unrelated project).",
    )

    @field_validator("pip")
    @classmethod
    def _not_someone_elses_asyncflow(cls, pip: list[str]) -> list[str]:
        for spec in pip:
            name = re.split(r"[\[<>=!~;@ ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")
            if name == "asyncflow":
                raise ValueError(
                    f"deploy.ray.pip lists {spec!r}: 'asyncflow' on PyPI is an unrelated project. AsyncFlow "
                    "reaches the cluster in its image (deploy/docker) or the uploaded working directory; "
                    "list only extra packages (e.g. 'redis[hiredis]>=5.0')"
                )
        return pip

    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the job's driver and every worker."
    )
    excludes: list[str] = Field(
        default_factory=lambda: list(EXCLUDES),
        max_length=256,
        description="Paths (gitignore syntax) of the working directory not uploaded with the job.",
    )
    entrypoint_num_cpus: float = Field(
        0.0,
        ge=0,
        le=1024,
        description="CPUs Ray reserves for the driver (`asyncflow run`) itself; also the RayJob's "
        "entrypointNumCpus.",
    )


class PodConfig(Section):
    """Resources and placement of one kind of pod."""

    cpu: str = Field("2", pattern=QUANTITY, description="CPU request and limit (a Kubernetes quantity).")
    memory: str = Field("8Gi", pattern=QUANTITY, description="Memory request and limit.")
    gpus: int = Field(0, ge=0, le=64, description="nvidia.com/gpu per pod; >0 selects the CUDA image.")
    node_selector: LABELS = Field(
        default_factory=dict, description="Node labels the pod must land on (e.g. a GPU node pool)."
    )


class HeadConfig(PodConfig):
    """The Ray head pod: Ray's services and the run's driver (`asyncflow run`)."""

    ray_cpus: int = Field(
        0,
        ge=0,
        le=1024,
        description="CPUs the head offers to actors (0: workers run every actor; the head only the "
        "driver and Ray's services).",
    )


class WorkerGroupConfig(PodConfig):
    """One Ray worker group: identical pods that run the run's actors."""

    name: str = Field(..., min_length=1, max_length=40, pattern=DNS_LABEL, description="Group name.")
    replicas: int = Field(1, ge=0, le=10_000, description="Pods at start.")
    min_replicas: int = Field(0, ge=0, le=10_000, description="Fewest pods (with autoscaling).")
    max_replicas: int = Field(8, ge=1, le=10_000, description="Most pods (with autoscaling).")
    ray_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each pod offers (`ray start --resources`), "
        "for roles that ask for them (e.g. trainer.resources: {H100: 1}).",
    )  # fmt: skip


class RedisDeployConfig(Section):
    """The Redis StatefulSet holding the durable data store (rendered when dataplane.backend is redis)."""

    image: str = Field(
        "redis:7.4-alpine",
        min_length=1,
        description="Redis server image. A tag moves: pin it by digest in production, e.g. "
        "`redis:7.4-alpine@sha256:...` (`docker buildx imagetools inspect redis:7.4-alpine` prints it); "
        "run_as_user/run_as_group must match the image's `redis` user.",
    )
    storage: str = Field("20Gi", pattern=QUANTITY, description="Size of its PersistentVolumeClaim (AOF).")
    storage_class: str | None = Field(None, description="StorageClass of the claim (None: the default).")
    appendfsync: Literal["always", "everysec"] = Field(
        "everysec", description="AOF fsync policy: `always` loses nothing, `everysec` at most 1 s of writes."
    )
    cpu: str = Field("1", pattern=QUANTITY, description="CPU request and limit.")
    memory: str = Field("4Gi", pattern=QUANTITY, description="Memory request and limit.")
    run_as_user: int = Field(
        999, ge=1, le=2**31 - 1, description="UID the server runs as (999: `redis` in the official images)."
    )
    run_as_group: int = Field(
        1000,
        ge=1,
        le=2**31 - 1,
        description="GID it runs as, and the group of its volume (1000: `redis` in the alpine image; "
        "999 in the Debian one).",
    )


class NetworkPolicyConfig(Section):
    """Who may connect to the run's pods (Ray's dashboard and GCS, Redis): the NetworkPolicy."""

    enabled: bool = Field(
        True,
        description="Render the NetworkPolicy (needs a CNI that enforces them: Calico, Cilium, ...).",
    )
    operator_namespace: str = Field(
        "default",
        max_length=63,
        pattern=DNS_LABEL,
        description="Namespace of the KubeRay operator, which polls the head's dashboard (port 8265).",
    )
    operator_labels: LABELS = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "kuberay-operator"},
        description="Labels of the operator's pods (those of its Helm chart by default).",
    )
    client_labels: list[LABELS] = Field(
        default_factory=list,
        max_length=16,
        description="Label sets of other pods in the run's namespace that may reach the run (e.g. a CI "
        "runner that submits jobs); the run's own pods always may.",
    )
    scrape_namespace: str = Field(
        "monitoring",
        max_length=63,
        pattern=DNS_LABEL,
        description="With logging.prometheus_port set: the namespace whose pods (Prometheus) may scrape "
        "the head's /metrics port, and only that port.",
    )


class K8sConfig(Section):
    """KubeRay manifests (`asyncflow render-k8s`): a RayJob or RayCluster with head and worker
    groups, a Redis StatefulSet, a Secret with its password, a ConfigMap with this config, and a
    shared volume for run directories (checkpoints are written by several pods)."""

    namespace: str = Field("asyncflow", max_length=63, pattern=DNS_LABEL, description="Kubernetes namespace.")
    name: str | None = Field(
        None,
        description="Prefix of every object's name: an RFC 1035 label of at most 40 characters "
        "(None: from run_name, see `k8s_name`: `Sort_Cluster.v2` -> `sort-cluster-v2`).",
    )
    image: str = Field(
        "asyncflow:0.1.0-cpu",
        min_length=1,
        description="Image of CPU pods (deploy/docker/Dockerfile, target cpu), as your cluster pulls it.",
    )
    gpu_image: str = Field(
        "asyncflow:0.1.0-cuda",
        min_length=1,
        description="Image of pods with GPUs (deploy/docker/Dockerfile, target cuda).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="When the kubelet pulls the images."
    )
    ray_version: str = Field(
        "2.60.0", pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$", description="Ray version inside the images."
    )
    head: HeadConfig = Field(default_factory=HeadConfig, description="The Ray head pod.")
    worker_groups: list[WorkerGroupConfig] = Field(
        default_factory=lambda: [WorkerGroupConfig(name="cpu", cpu="4", memory="16Gi")],
        min_length=1,
        max_length=32,
        description="Ray worker groups (e.g. a CPU group for reward and the store, a GPU group for "
        "rollout and the trainer).",
    )
    autoscaling: bool = Field(
        False, description="Ray's autoscaler adds and removes worker pods within min/max_replicas."
    )
    redis: RedisDeployConfig = Field(default_factory=RedisDeployConfig, description="The Redis StatefulSet.")
    runs_storage: str = Field(
        "100Gi", pattern=QUANTITY, description="Size of the shared (ReadWriteMany) claim of run directories."
    )
    runs_storage_class: str | None = Field(
        None,
        description="StorageClass that offers ReadWriteMany (NFS, EFS, Filestore, CephFS; None: default).",
    )
    runs_mount: str = Field(
        "/runs", pattern=r"^/", description="Where every pod mounts it; the run's output_dir."
    )
    ttl_s_after_finished: int = Field(
        300,
        ge=0,
        le=2**31 - 1,
        description="RayJob: seconds its cluster stays after the job ends (its logs go with it; run "
        "directories stay on the runs volume).",
    )
    active_deadline_s: int = Field(
        7 * 24 * 3600,
        ge=1,
        le=2**31 - 1,
        description="RayJob: seconds after which KubeRay stops the job and its cluster, however far it got "
        "(resume it from its last checkpoint).",
    )
    ray_auth: Literal["token", "disabled"] = Field(
        "token",
        description="Ray's token authentication (KubeRay authOptions; KubeRay >= 1.6, Ray >= 2.52): "
        "every request to the dashboard, job server and GCS needs the token of the `<name>-ray-auth` "
        "Secret. `disabled` lets any pod that reaches the head run code on the cluster.",
    )
    network_policy: NetworkPolicyConfig = Field(
        default_factory=NetworkPolicyConfig, description="The NetworkPolicy around the run's pods."
    )
    gcs_fault_tolerance: bool = Field(
        False,
        description="Ray's GCS keeps its state in the run's Redis (KubeRay gcsFaultToleranceOptions), so "
        "the cluster survives a restart of the head pod; needs dataplane.backend: redis.",
    )
    run_as_user: int = Field(
        1000,
        ge=1,
        le=2**31 - 1,
        description="UID of the Ray pods: the image's non-root user (1000: `ray` in rayproject/ray, the "
        "USER of deploy/docker/Dockerfile).",
    )
    run_as_group: int = Field(
        100, ge=1, le=2**31 - 1, description="GID of the Ray pods and of their volumes (100: `users`)."
    )
    writable_dirs: list[str] = Field(
        default_factory=lambda: ["/tmp", "/home/ray/.cache"],
        max_length=16,
        description="Directories of Ray pods backed by an emptyDir: the root filesystem is read-only. "
        "/tmp holds Ray's session directory (/tmp/ray) and runtime_env packages; /dev/shm (Ray's "
        "object store) is always a memory-backed emptyDir.",
    )

    @field_validator("name")
    @classmethod
    def _rfc1035(cls, name: str | None) -> str | None:
        if name is not None and (len(name) > NAME_MAX or not re.match(DNS_1035, name)):
            raise ValueError(
                f"{name!r} is not a valid object name: expected at most {NAME_MAX} characters of a-z, 0-9 "
                "and '-', starting with a letter and ending in a letter or digit (KubeRay and Service "
                f"names are RFC 1035 labels); use {k8s_name(name)!r}, or leave it out to derive it from "
                "run_name"
            )
        return name

    @field_validator("writable_dirs")
    @classmethod
    def _absolute(cls, dirs: list[str]) -> list[str]:
        for d in dirs:
            if not d.startswith("/") or d.rstrip("/") in ("", "/dev/shm"):
                raise ValueError(f"{d!r} must be an absolute path other than / and /dev/shm, e.g. '/tmp'")
        if len(set(dirs)) != len(dirs):
            raise ValueError(f"each directory may be listed once, got {dirs}")
        return dirs

    @field_validator("worker_groups")
    @classmethod
    def _distinct_groups(cls, groups: list[WorkerGroupConfig]) -> list[WorkerGroupConfig]:
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"worker group names must differ, got {names}")
        for g in groups:
            if not g.min_replicas <= g.replicas <= g.max_replicas:
                raise ValueError(
                    f"worker group {g.name!r}: need min_replicas <= replicas <= max_replicas, got "
                    f"{g.min_replicas} <= {g.replicas} <= {g.max_replicas}"
                )
        return groups


class DeployConfig(Section):
    """Where the run is deployed; the run itself ignores this section."""

    ray: RayJobConfig = Field(default_factory=RayJobConfig, description="Ray job submission.")
    k8s: K8sConfig = Field(default_factory=K8sConfig, description="Kubernetes (KubeRay) manifests.")
