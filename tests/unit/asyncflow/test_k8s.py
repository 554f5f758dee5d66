"""Kubernetes manifests: every rendered object validates, the checked-in ones are fresh.

Core objects are checked with kubernetes-validate (strict: an unknown field is an error),
RayJob and RayCluster against KubeRay's CRD schemas (tests/data/kuberay/, made strict the
same way: the API server would prune an unknown field, which hides a typo). There is no
Kubernetes cluster here: this validation is the test.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from asyncflow import k8s
from asyncflow.config import load_config, parse_config
from asyncflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
CRDS = ROOT / "tests" / "data" / "kuberay"
K8S_VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]


def strict(schema):
    """The schema with unknown fields forbidden wherever it lists the known ones."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators():
    return {
        kind: jsonschema.Draft7Validator(
            strict(json.loads((CRDS / f"{kind.lower()}-v1.schema.json").read_text()))
        )
        for kind in ("RayJob", "RayCluster")
    }


def configs():
    return {
        "cluster": load_config(ROOT / "examples" / "cluster.yaml"),
        "sort-memory": load_config(ROOT / "examples" / "sort.yaml"),
    }


def pod_templates(obj: dict) -> list[dict]:
    spec = obj["spec"].get("rayClusterSpec", obj["spec"])
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


@pytest.mark.parametrize("name", ["cluster", "sort-memory"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_validates(name, version, crd_validators):
    files = k8s.render(configs()[name])
    kinds = [doc["kind"] for docs in files.values() for doc in docs]
    if name == "cluster":  # the Redis store is rendered only for dataplane.backend: redis
        assert {"StatefulSet", "Service", "Secret"} <= set(kinds)
    else:
        assert not {"StatefulSet", "Secret"} & set(kinds)
    for docs in files.values():
        for doc in docs:
            if doc["apiVersion"].startswith("ray.io/"):
                crd_validators[doc["kind"]].validate(doc)
                for i, template in enumerate(pod_templates(doc)):  # PodSpecs, also by Kubernetes' own schema
                    pod = {
                        "apiVersion": "v1",
                        "kind": "PodTemplate",
                        "metadata": {"name": f"t{i}"},
                        "template": template,
                    }
                    kubernetes_validate.validate(pod, version, strict=True)
            else:
                kubernetes_validate.validate(doc, version, strict=True)


def test_validation_catches_mistakes(crd_validators):
    files = k8s.render(configs()["cluster"])
    job = files["rayjob.yaml"][0]
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        crd_validators["RayJob"].validate(typo)
    wrong = copy.deepcopy(job)
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="two"):
        crd_validators["RayJob"].validate(wrong)
    claim = copy.deepcopy(files["storage.yaml"][0])
    claim["spec"]["accessMode"] = ["ReadWriteMany"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(claim, K8S_VERSIONS[0], strict=True)


def test_the_cluster_gets_the_same_config_adjusted_for_it():
    config = configs()["cluster"]
    files = k8s.render(config, redis_password="pw-only-in-the-secret")
    (cm,) = files["configmap.yaml"]
    text = cm["data"]["config.yaml"]
    on_cluster = parse_config(yaml.safe_load(text))
    assert on_cluster.output_dir == config.deploy.k8s.runs_mount
    assert on_cluster.dataplane.redis.password_env == k8s.PASSWORD_ENV
    assert on_cluster.dataplane.redis.url == "redis://sort-cluster-redis.asyncflow.svc.cluster.local:6379/0"
    assert on_cluster.trainer == config.trainer and on_cluster.rollout == config.rollout
    assert "deploy" not in yaml.safe_load(text)
    # The password is in the Secret and nowhere else; pods read it from there.
    everything = "".join(k8s.dump(docs) for docs in files.values())
    assert everything.count("pw-only-in-the-secret") == 1
    assert files["secret.yaml"][0]["stringData"]["password"] == "pw-only-in-the-secret"
    job = files["rayjob.yaml"][0]["spec"]
    assert job["entrypoint"] == "asyncflow run /etc/asyncflow/config.yaml"
    groups = {g["groupName"]: g for g in job["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]
    assert gpu["containers"][0]["image"] == config.deploy.k8s.gpu_image
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert groups["cpu"]["template"]["spec"]["containers"][0]["image"] == config.deploy.k8s.image
    assert files["raycluster.yaml"][0]["spec"] == job["rayClusterSpec"]  # one cluster spec, two variants
    # A fresh render makes up a fresh password.
    assert k8s.render(config)["secret.yaml"] != k8s.render(config)["secret.yaml"]


def test_checked_in_manifests_are_the_render_of_the_example(tmp_path):
    """deploy/k8s/ is `asyncflow render-k8s examples/cluster.yaml -o deploy/k8s --no-secret`."""
    args = ["render-k8s", "examples/cluster.yaml", "-o", str(tmp_path), "--no-secret"]
    out = subprocess.run(
        [sys.executable, "-m", "asyncflow.cli", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.yaml")}
    shipped = {p.name: p.read_text() for p in (ROOT / "deploy" / "k8s").glob("*.yaml")}
    assert fresh == shipped, "deploy/k8s/ is stale: run the command in this test's docstring"


def test_stdout_holds_one_ray_variant(tmp_path):
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    args = [
        "render-k8s",
        "examples/cluster.yaml",
        "--kind",
        "raycluster",
        "--redis-password-file",
        str(password),
    ]
    out = subprocess.run(
        [sys.executable, "-m", "asyncflow.cli", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout)]
    assert kinds == [
        "Namespace",
        "Secret",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Service",
        "StatefulSet",
        "RayCluster",
    ]
    assert "stringData:\n  password: s3cret\n" in out.stdout


def test_bad_deploy_settings_are_refused_with_the_field():
    with pytest.raises(ConfigError, match="deploy.k8s.worker_groups.*must differ"):
        parse_config({"deploy": {"k8s": {"worker_groups": [{"name": "a"}, {"name": "a"}]}}})
    with pytest.raises(ConfigError, match=r"min_replicas <= replicas <= max_replicas.*0 <= 9 <= 8"):
        parse_config({"deploy": {"k8s": {"worker_groups": [{"name": "a", "replicas": 9}]}}})
    with pytest.raises(ConfigError, match="deploy.k8s.head.memory = '8 GB'"):
        parse_config({"deploy": {"k8s": {"head": {"memory": "8 GB"}}}})
    with pytest.raises(ConfigError, match="deploy.k8s.worker_groups.0.name = 'GPU_pool'"):
        parse_config({"deploy": {"k8s": {"worker_groups": [{"name": "GPU_pool"}]}}})
    with pytest.raises(ConfigError, match="keep one of them"):
        parse_config({"dataplane": {"redis": {"url": "redis://:pw@h:6379/0", "password_env": "PW"}}})


def test_the_dockerfile_builds_the_images_the_manifests_name():
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    stages = [line.split()[-1] for line in text.splitlines() if line.startswith("FROM ") and " AS " in line]
    assert {"cpu", "cuda"} <= set(stages)
    config = configs()["cluster"].deploy.k8s
    readme = (ROOT / "deploy" / "README.md").read_text()
    for target, image in (("cpu", config.image), ("cuda", config.gpu_image)):
        assert f"--target {target}" in readme and image.rsplit(":", 1)[1] in readme
