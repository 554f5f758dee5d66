"""Kubernetes manifests: every rendered object validates, the checked-in ones are fresh.

Core objects are checked with kubernetes-validate (strict: an unknown field is an error),
RayJob and RayCluster against KubeRay's CRD schemas (tests/data/kuberay/, made strict the
same way: the API server would prune an unknown field, which hides a typo), every pod
template against the Pod Security Standards' restricted profile (`restricted_violations`),
names against the rules KubeRay and Kubernetes apply. There is no Kubernetes cluster here:
this validation is the test.
"""

from __future__ import annotations

import copy
import json
import re
import stat
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


# Every example that deploys somewhere, the in-memory store, and the options that change the shape.
DEPLOYED = sorted(
    p.stem for p in (ROOT / "examples").glob("*.yaml") if "deploy" in yaml.safe_load(p.read_text())
)
VARIANTS = {
    **{name: (f"{name}.yaml", []) for name in DEPLOYED},
    "sort-memory": ("sort.yaml", []),
    "cluster-ha": ("cluster.yaml", ["deploy.k8s.gcs_fault_tolerance=true", "deploy.k8s.autoscaling=true"]),
    "cluster-metrics": ("cluster.yaml", ["logging.prometheus_port=9464"]),
}
PASSWORD, TOKEN = "pw-only-in-the-secret", "token-only-in-the-secret"


def load(variant: str, *overrides: str):
    file, sets = VARIANTS[variant]
    return load_config(ROOT / "examples" / file, [*sets, *overrides])


def configs():
    return {"cluster": load("cluster"), "sort-memory": load("sort-memory")}


def pod_templates(obj: dict) -> list[dict]:
    """Every pod template of an object: Ray groups, the RayJob's submitter, a StatefulSet's."""
    if obj["kind"] == "StatefulSet":
        return [obj["spec"]["template"]]
    if not obj["apiVersion"].startswith("ray.io/"):
        return []
    spec = obj["spec"].get("rayClusterSpec", obj["spec"])
    submitter = [obj["spec"]["submitterPodTemplate"]] if "submitterPodTemplate" in obj["spec"] else []
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"]), *submitter]


def objects(files: dict) -> list[dict]:
    return [doc for docs in files.values() for doc in docs]


# The Pod Security Standards (kubernetes.io/docs/concepts/security/pod-security-standards/),
# baseline and restricted profiles, Linux pods: what each control allows, field by field.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def restricted_violations(pod: dict) -> list[str]:
    """What in a PodSpec breaks the restricted profile (empty: it passes)."""
    bad: list[str] = []
    psc = pod.get("securityContext", {})
    containers = [
        c for key in ("initContainers", "containers", "ephemeralContainers") for c in pod.get(key, [])
    ]
    # baseline
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(f"{key} must be false")
    for sc in [psc] + [c.get("securityContext", {}) for c in containers]:
        if sc.get("windowsOptions", {}).get("hostProcess"):
            bad.append("hostProcess must be false")
        se = sc.get("seLinuxOptions", {})
        if se.get("type", "container_t") not in ("", "container_t", "container_init_t", "container_kvm_t"):
            bad.append("seLinuxOptions.type not allowed")
        if se.get("user") or se.get("role"):
            bad.append("seLinuxOptions.user/role must be unset")
        if sc.get("appArmorProfile", {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
            bad.append("appArmorProfile must be RuntimeDefault or Localhost")
        if sc.get("runAsUser") == 0:
            bad.append("runAsUser must not be 0")
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl['name']} is not safe")
    # restricted: volumes
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUMES)} not allowed")
    # restricted: seccomp and non-root, at pod level or in every container
    pod_seccomp = psc.get("seccompProfile", {}).get("type")
    for c in containers:
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                bad.append(f"{name}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount must be Default")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad.append(f"{name}: runAsNonRoot must be true")
        if sc.get("seccompProfile", {}).get("type", pod_seccomp) not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities may add only NET_BIND_SERVICE")
    if pod_seccomp == "Unconfined":
        bad.append("pod seccompProfile must not be Unconfined")
    return bad


def test_the_restricted_checker_catches_each_rule():
    files = k8s.render(configs()["cluster"])
    (pod,) = [t["spec"] for t in pod_templates(files["redis.yaml"][1])]
    assert restricted_violations(pod) == []
    for path, value, words in [
        (("containers", 0, "securityContext", "runAsNonRoot"), False, "runAsNonRoot"),
        (("securityContext", "seccompProfile", "type"), "Unconfined", "seccomp"),
        (("containers", 0, "securityContext", "allowPrivilegeEscalation"), True, "allowPrivilegeEscalation"),
        (("containers", 0, "securityContext", "capabilities", "drop"), [], "drop ALL"),
        (("containers", 0, "securityContext", "capabilities", "add"), ["SYS_ADMIN"], "NET_BIND_SERVICE"),
        (("containers", 0, "securityContext", "runAsUser"), 0, "runAsUser"),
        (("hostNetwork",), True, "hostNetwork"),
        (("volumes", 0), {"name": "h", "hostPath": {"path": "/"}}, "hostPath"),
    ]:
        broken = copy.deepcopy(pod)
        at = broken
        for key in path[:-1]:
            at = at[key]
        at[path[-1]] = value
        assert any(words in v for v in restricted_violations(broken)), (path, restricted_violations(broken))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_validates(variant, version, crd_validators):
    files = k8s.render(load(variant))
    kinds = [doc["kind"] for doc in objects(files)]
    redis = variant != "sort-memory"
    assert {"Secret", "NetworkPolicy"} <= set(kinds)
    assert ({"StatefulSet", "Service", "PodDisruptionBudget"} <= set(kinds)) is redis
    for doc in objects(files):
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


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_pod_is_restricted_and_behind_auth(variant):
    config = load(variant)
    files = k8s.render(config)
    templates = [t for doc in objects(files) for t in pod_templates(doc)]
    groups = len(config.deploy.k8s.worker_groups)  # RayJob: head, groups, submitter; RayCluster; Redis
    assert len(templates) == (2 + groups) + (1 + groups) + (variant != "sort-memory")
    for template in templates:
        assert restricted_violations(template["spec"]) == [], template["metadata"]
        for c in template["spec"]["containers"]:  # a read-only root, and emptyDirs where Ray writes
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
        if template["metadata"]["labels"]["app.kubernetes.io/component"] != "redis":
            mounts = {m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
            assert {"/tmp", "/dev/shm"} <= mounts
            assert template["spec"]["securityContext"]["runAsUser"] == config.deploy.k8s.run_as_user
    for doc in files["rayjob.yaml"] + files["raycluster.yaml"]:
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["authOptions"] == {"mode": "token", "secretName": f"{k8s.object_name(config)}-ray-auth"}
    secrets = {s["metadata"]["name"]: s["stringData"] for s in files["secret.yaml"]}
    assert "auth_token" in secrets[f"{k8s.object_name(config)}-ray-auth"]  # the key KubeRay reads
    # Every pod of the run is selected, and admitted only from the run's pods and the operator.
    (policy,) = files["networkpolicy.yaml"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for template in templates:
        assert selector.items() <= template["metadata"]["labels"].items()
    scrape = [{"protocol": "TCP", "port": config.logging.prometheus_port}]  # its own test below
    peers = [
        peer for rule in policy["spec"]["ingress"] if rule.get("ports") != scrape for peer in rule["from"]
    ]
    assert peers == [
        {"podSelector": {"matchLabels": selector}},
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "default"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
        },
    ]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_secret_value_outside_a_secret(variant):
    files = k8s.render(load(variant), redis_password=PASSWORD, ray_token=TOKEN)
    for doc in objects(files):
        text = k8s.dump([doc])
        if doc["kind"] == "Secret":
            continue
        assert PASSWORD not in text and TOKEN not in text, (doc["kind"], doc["metadata"]["name"])
    everything = "".join(k8s.dump(docs) for docs in files.values())
    assert TOKEN in everything and (PASSWORD in everything) is (variant != "sort-memory")
    for doc in objects(files):  # nor on a command line: the server reads a config file from the Secret
        if doc["kind"] == "StatefulSet":
            (c,) = doc["spec"]["template"]["spec"]["containers"]
            assert "requirepass" not in json.dumps(c) and " -a " not in json.dumps(c)
            assert c["env"] == [k8s.password_env("sort-cluster", "REDISCLI_AUTH")]  # what redis-cli reads
            assert {"readinessProbe", "livenessProbe"} <= set(c)


def test_gcs_fault_tolerance_uses_the_run_redis_without_reserved_variables():
    config = load("cluster-ha")
    spec = k8s.render(config)["raycluster.yaml"][0]["spec"]
    ft = spec["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == f"sort-cluster-redis.asyncflow.svc.cluster.local:{k8s.REDIS_PORT}"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {
        "name": "sort-cluster-redis",
        "key": "password",
    }
    # KubeRay refuses a head that sets these itself, or the ft-enabled annotation beside the options.
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    names = {e["name"] for e in head.get("env", [])}
    assert not {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS", "REDIS_USERNAME"} & names
    assert "redis-password" not in spec["headGroupSpec"]["rayStartParams"]
    assert spec["autoscalerOptions"]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    with pytest.raises(ConfigError, match="gcs_fault_tolerance.*dataplane.backend = 'memory'"):
        k8s.render(load("sort-memory", "deploy.k8s.gcs_fault_tolerance=true"))


def test_the_rayjob_runs_the_module_with_limits():
    config = load("cluster", "deploy.ray.entrypoint_num_cpus=1.5", "deploy.k8s.active_deadline_s=3600")
    job = k8s.render(config)["rayjob.yaml"][0]["spec"]
    assert job["entrypoint"] == "python -m asyncflow.cli run /etc/asyncflow/config.yaml --resume-if-exists"
    assert job["entrypointNumCpus"] == 1.5
    assert job["activeDeadlineSeconds"] == 3600
    assert job["ttlSecondsAfterFinished"] == 300
    assert "entrypointNumCpus" not in k8s.render(load("cluster"))["rayjob.yaml"][0]["spec"]


def test_a_stopped_job_has_time_for_its_final_checkpoint():
    config = load("cluster", "sigterm_grace_s=40", "deploy.ray.env_vars={FOO: bar}")
    job = k8s.render(config)["rayjob.yaml"][0]["spec"]
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    assert env == {"RAY_JOB_STOP_WAIT_TIME_S": "45", "FOO": "bar"}  # SIGKILL only after the grace
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["terminationGracePeriodSeconds"] == 50


def test_auth_and_policy_can_be_turned_off():
    sets = ["deploy.k8s.ray_auth=disabled", "deploy.k8s.network_policy.enabled=false"]
    files = k8s.render(load("sort-memory", *sets))
    assert "secret.yaml" not in files and "networkpolicy.yaml" not in files
    assert files["raycluster.yaml"][0]["spec"]["authOptions"] == {"mode": "disabled"}


def test_prometheus_scrapes_the_head_where_the_driver_serves_metrics():
    files = k8s.render(load("cluster-metrics"))
    head = files["raycluster.yaml"][0]["spec"]["headGroupSpec"]["template"]
    assert {"name": "metrics", "containerPort": 9464} in head["spec"]["containers"][0]["ports"]
    assert head["metadata"]["annotations"]["prometheus.io/port"] == "9464"
    config = yaml.safe_load(files["configmap.yaml"][0]["data"]["config.yaml"])
    assert config["logging"] == {"prometheus_port": 9464, "prometheus_host": "0.0.0.0"}
    (rule,) = [r for r in files["networkpolicy.yaml"][0]["spec"]["ingress"] if r.get("ports") == [
        {"protocol": "TCP", "port": 9464}]]  # fmt: skip
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    plain = k8s.render(load("cluster"))["raycluster.yaml"][0]["spec"]["headGroupSpec"]["template"]
    assert "annotations" not in plain["metadata"]
    assert all(p["name"] != "metrics" for p in plain["spec"]["containers"][0]["ports"])


# --- names ---------------------------------------------------------------------------------

DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def check_names(files: dict) -> None:
    """Names as the API server and KubeRay check them (validation.go: IsDNS1035Label, at most 47
    characters for a RayJob, 53 for a RayCluster; Services are RFC 1035 labels too)."""
    for doc in objects(files):
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and DNS_1123.match(name), name
        if doc["kind"] in ("Service", "RayJob", "RayCluster"):
            assert DNS_1035.match(name), name
        assert len(name) <= {"RayJob": 47, "RayCluster": 53}.get(doc["kind"], 63), name
        if doc["kind"] == "StatefulSet":  # its pods' controller-revision-hash label: <name>-<10 characters>
            assert len(name) + 11 <= 63
        for template in [doc.get("metadata", {}), *(t["metadata"] for t in pod_templates(doc))]:
            for value in template.get("labels", {}).values():
                assert len(value) <= 63 and LABEL_VALUE.match(value), value


@pytest.mark.parametrize(
    ("run_name", "expected"),
    [
        ("sort-cluster", "sort-cluster"),
        ("Sort_Cluster.V2", "sort-cluster-v2"),  # uppercase, '_' and '.'
        ("2024-sweep", "run-2024-sweep"),  # a leading digit: RFC 1035 needs a letter
        ("___", "run"),
        ("-lead--and--trail-", "lead-and-trail"),
        ("a" * 39 + "-" + "b" * 20, "a" * 39),  # the cut lands after a '-'
        ("x" * 128, "x" * 40),
        ("9" * 127 + "a", "run-" + "9" * 36),
    ],
)
def test_run_names_become_valid_object_names(run_name, expected, crd_validators):
    config = load("cluster", f"run_name={run_name}", "deploy.k8s.namespace=" + "n" * 63)
    assert k8s.object_name(config) == expected
    files = k8s.render(config)
    check_names(files)
    for doc in objects(files):
        if doc["apiVersion"].startswith("ray.io/"):
            crd_validators[doc["kind"]].validate(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize(
    ("name", "fix"),
    [("2fast", "run-2fast"), ("Sort", "sort"), ("a-", "a"), ("a_b", "a-b"), ("a" * 41, "a" * 40)],
)
def test_bad_object_names_are_refused_with_the_fix(name, fix):
    with pytest.raises(ConfigError, match=rf"deploy.k8s.name.*{name!r}.*RFC 1035.*use {fix!r}"):
        parse_config({"deploy": {"k8s": {"name": name}}})
    assert parse_config({"deploy": {"k8s": {"name": fix}}}).deploy.k8s.name == fix


def test_namespaces_are_rfc_1123_labels_of_63_characters():
    assert parse_config({"deploy": {"k8s": {"namespace": "0" + "n" * 62}}})
    for bad in ("n" * 64, "Team", "team-"):
        with pytest.raises(ConfigError, match="deploy.k8s.namespace"):
            parse_config({"deploy": {"k8s": {"namespace": bad}}})


def test_secret_yaml_is_written_for_its_owner_only(tmp_path):
    files = k8s.render(configs()["cluster"])
    (tmp_path / "secret.yaml").write_text("old")
    (tmp_path / "secret.yaml").chmod(0o644)
    k8s.write(files, tmp_path, "# header\n")
    assert stat.S_IMODE((tmp_path / "secret.yaml").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "rayjob.yaml").stat().st_mode) == 0o644
    assert (tmp_path / "rayjob.yaml").read_text() == "# header\n" + k8s.dump(files["rayjob.yaml"])


def test_submit_leaves_caches_behind():
    excludes = parse_config({}).deploy.ray.excludes
    assert {".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__", ".venv", "runs"} <= set(excludes)
    ignored = (ROOT / ".dockerignore").read_text().split()
    for cache in (".mypy_cache", ".ruff_cache", ".pytest_cache", ".venv", "runs"):
        assert cache in ignored


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
    assert (
        on_cluster.dataplane.redis.url
        == f"redis://sort-cluster-redis.asyncflow.svc.cluster.local:{k8s.REDIS_PORT}/0"
    )
    assert on_cluster.trainer == config.trainer and on_cluster.rollout == config.rollout
    assert "deploy" not in yaml.safe_load(text)
    # The password is in the Secret and nowhere else; pods read it from there.
    (redis_secret,) = [s for s in files["secret.yaml"] if s["metadata"]["name"] == "sort-cluster-redis"]
    assert redis_secret["stringData"]["password"] == "pw-only-in-the-secret"
    assert redis_secret["stringData"]["redis.conf"] == 'requirepass "pw-only-in-the-secret"\n'
    job = files["rayjob.yaml"][0]["spec"]
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


def test_written_secrets_are_private_and_carry_the_given_token(tmp_path):
    token = tmp_path / "token"
    token.write_text("t0ken-from-the-head\n")
    args = [
        "render-k8s",
        "examples/cluster.yaml",
        "-o",
        str(tmp_path / "out"),
        "--ray-token-file",
        str(token),
    ]
    out = subprocess.run(
        [sys.executable, "-m", "asyncflow.cli", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    secret = tmp_path / "out" / "secret.yaml"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out" / "rayjob.yaml").stat().st_mode & 0o077 == 0o044  # the rest: world-readable
    assert "t0ken-from-the-head" in secret.read_text()
    assert not any(
        "t0ken-from-the-head" in p.read_text() for p in (tmp_path / "out").glob("*.yaml") if p != secret
    )


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
        "Secret",
        "ConfigMap",
        "PersistentVolumeClaim",
        "NetworkPolicy",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
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
    with pytest.raises(ConfigError, match="deploy.k8s.writable_dirs.*absolute"):
        parse_config({"deploy": {"k8s": {"writable_dirs": ["tmp"]}}})
    with pytest.raises(ConfigError, match="listed once"):
        parse_config({"deploy": {"k8s": {"writable_dirs": ["/tmp", "/tmp"]}}})
    with pytest.raises(ConfigError, match="keep one of them"):
        parse_config({"dataplane": {"redis": {"url": "redis://:pw@h:6379/0", "password_env": "PW"}}})


def test_the_dockerfile_builds_the_images_the_manifests_name():
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    stages = {}  # name -> its lines
    for line in text.splitlines():
        if line.startswith("FROM "):
            stages[line.split()[-1]] = current = []
        elif stages:
            current.append(line)
    assert {"builder", "deps-cpu", "deps-cuda", "cpu", "cuda"} <= set(stages)
    config = configs()["cluster"].deploy.k8s
    for target in ("cpu", "cuda"):
        deps = "\n".join(stages[f"deps-{target}"])
        # Dependencies from pyproject.toml alone: a code change does not reinstall torch.
        assert "COPY --chown=1000:100 pyproject.toml" in deps and "asyncflow asyncflow" not in deps
        runtime = "\n".join(stages[target])
        assert "--from=builder" in runtime and "--no-deps" in runtime
        assert f"USER {config.run_as_user}:{config.run_as_group}" in runtime  # the pods' fixed UID
    readme = (ROOT / "deploy" / "README.md").read_text()
    for target, image in (("cpu", config.image), ("cuda", config.gpu_image)):
        assert f"--target {target}" in readme and image.rsplit(":", 1)[1] in readme


def test_the_image_installs_what_pyproject_names(tmp_path):
    script = ROOT / "deploy" / "docker" / "requirements.py"
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "asyncflow"\ndependencies = ["torch==2.13.0"]\n'
        '[project.optional-dependencies]\nredis = ["redis>=5"]\nall = ["asyncflow[redis]", "vllm"]\n'
    )
    out = subprocess.run(
        [sys.executable, script, pyproject, "all"], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["torch==2.13.0", "vllm", "redis>=5"]
    out = subprocess.run([sys.executable, script, pyproject, "nope"], capture_output=True, text=True)
    assert out.returncode != 0 and "no extra 'nope'" in out.stderr


def _offered(spec: dict) -> dict[str, float]:
    """What the rendered cluster offers Ray, read back from the manifests alone: each worker
    group's pods (replicas; max with autoscaling) x their CPU and GPU limits and the custom
    resources of their `ray start`, plus the head's num-cpus."""
    from asyncflow.k8s.cluster import cores

    offer = {"CPU": float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"])}
    for group in spec["workerGroupSpecs"]:
        pods = group["maxReplicas"] if spec["enableInTreeAutoscaling"] else group["replicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        custom = group["rayStartParams"].get("resources", '"{}"')
        per_pod = {"CPU": cores(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0)),
                   **json.loads(custom[1:-1].replace('\\"', '"'))}  # fmt: skip
        for key, amount in per_pod.items():
            offer[key] = offer.get(key, 0.0) + amount * pods
    return offer


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_rendered_worker_groups_hold_what_the_run_asks_for(variant):
    """The sum: every resource the run's roles reserve on Ray fits in what the rendered cluster
    offers, and no GPU is rendered that no role asks for."""
    config = load(variant)
    spec = k8s.render(config)["rayjob.yaml"][0]["spec"]["rayClusterSpec"]
    offer, need = _offered(spec), config.resources_needed()
    for key, amount in need.items():
        if key != "memory":
            assert amount <= offer.get(key, 0.0), (key, amount, offer)
    assert (offer.get("GPU", 0.0) > 0) == (need.get("GPU", 0.0) > 0), (offer, need)


def _cluster_with(*groups: dict, **sets: object):
    data = yaml.safe_load((ROOT / "examples" / "cluster.yaml").read_text())
    data["deploy"]["k8s"]["worker_groups"] = list(groups)
    for path, value in sets.items():
        section, _, field = path.rpartition("__")
        (data.setdefault(section, {}) if section else data)[field] = value
    return parse_config(data)


CPU8 = {"name": "cpu", "cpu": "8", "replicas": 1}
GPU1 = {"name": "gpu", "cpu": "4", "replicas": 1, "gpus": 1}


@pytest.mark.parametrize(
    ("groups", "sets", "expected"),
    [
        ((CPU8, GPU1), {"trainer__num_gpus": 0}, "worker_groups ['gpu'] have GPUs, but no role asks for one"),
        ((CPU8,), {}, "asks Ray for 1 GPU in all (trainer 1 x (1 CPU, 1 GPU)), but deploy.k8s offers 0"),
        (
            (CPU8, GPU1),
            {"rollout__num_workers": 30},
            "asks Ray for 17 CPU in all (trainer 1 x (1 CPU, 1 GPU); rollout 30 x (0.5 CPUs); "
            "reward 2 x (0.25 CPUs), and the store), but deploy.k8s offers 12",
        ),
        (
            (CPU8, GPU1),
            {"trainer__resources": {"H100": 1}},
            "Raise a worker group's replicas or its pods' ray_resources['H100']",
        ),  # fmt: skip
        (
            (CPU8, GPU1),
            {"placement": "colocated", "rollout__num_cpus": 4},
            "placement = 'colocated': a trainer rank and a rollout worker needs 5 CPUs, 1 GPU on one "
            "node, but no pod of deploy.k8s offers that much. Raise a worker group's cpu or gpus per pod, "
            "or ask for less (trainer, rollout), or set placement: split",
        ),
        (
            (CPU8, {**GPU1, "replicas": 3}),
            {"rollout__num_gpus": 2, "rollout__num_workers": 1},  # 3 GPUs in all, but 2 on one pod
            "one rollout actor needs 0.5 CPUs, 2 GPUs on one node, but no pod of deploy.k8s offers that much",
        ),
    ],
)
def test_worker_groups_that_do_not_match_the_run_are_refused(groups, sets, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        k8s.render(_cluster_with(*groups, **sets))


def test_a_colocated_pair_fits_one_pod_of_the_gpu_group():
    config = _cluster_with(CPU8, GPU1, placement="colocated")
    # the trainer's GPU pod holds its rollout worker too; the second worker has no rank beside it
    assert config.bundles() == [{"CPU": 1.5, "GPU": 1.0}, {"CPU": 0.5}]
    assert k8s.render(config)


def test_custom_resources_reach_ray_start_and_satisfy_the_roles_that_ask():
    group = {**GPU1, "ray_resources": {"H100": 1}}
    config = _cluster_with(CPU8, group, trainer__resources={"H100": 1})
    spec = k8s.render(config)["raycluster.yaml"][0]["spec"]
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["rayStartParams"] == {"resources": '"{\\"H100\\": 1.0}"'}  # as KubeRay's docs write it
    assert _offered(spec)["H100"] == 1.0
    # with the autoscaler, max_replicas pods count
    scaled = _cluster_with(CPU8, {**GPU1, "max_replicas": 3}, rollout__num_gpus=1)  # 1 + 2 x 1 GPUs
    with pytest.raises(ConfigError, match="offers 1 "):
        k8s.render(scaled)
    data = scaled.model_dump(mode="json")
    data["deploy"]["k8s"]["autoscaling"] = True
    assert k8s.render(parse_config(data))
