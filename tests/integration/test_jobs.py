"""Ray Job Submission against a real Ray head of this module's own.

The head (`ray start --head --block`, job server included, token authentication on) listens
on free ports and is stopped through its own process group afterwards. Jobs carry this
working tree as their working directory; the packages come from the environment that
started the head (the same virtualenv), so nothing is installed at run time.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PORTS = ["port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
         "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
         "node-manager-port", "object-manager-port"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self) -> None:
        self.ports = {name: free_port() for name in PORTS}
        self.temp = tempfile.mkdtemp(prefix="af-ray-", dir="/tmp")  # short: Ray's socket paths must fit
        token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        self.env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.url = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.gcs = f"127.0.0.1:{self.ports['port']}"
        args = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "6", "--disable-usage-stats",
                "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--temp-dir", self.temp,
                *(f"--{name}={port}" for name, port in self.ports.items())]  # fmt: skip
        self.log = open(Path(self.temp) / "head.log", "w")
        self.proc = subprocess.Popen(
            args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_up(token)

    def _wait_up(self, token: str, timeout_s: float = 90) -> None:
        request = urllib.request.Request(
            f"{self.url}/api/version", headers={"Authorization": f"Bearer {token}"}
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (Path(self.temp) / "head.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(request, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the Ray head's job server at {self.url} did not come up")

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(args, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0 or not check, f"{args}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out

    def cli(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "asyncflow.cli", *args, timeout=timeout, check=check)

    def stop(self) -> None:
        """Stop the jobs still running (their drivers run in sessions of their own), then SIGKILL
        the head's process group: GCS, raylet, dashboard and their workers (SIGTERM drains for 30 s)."""
        stop_jobs = (
            "import sys, time; from ray.job_submission import JobSubmissionClient\n"
            "c = JobSubmissionClient(sys.argv[1])\n"
            "live = lambda: [j for j in c.list_jobs() if not j.status.is_terminal()]\n"
            "[c.stop_job(j.submission_id) for j in live()]\n"
            "deadline = time.time() + 30\n"
            "while live() and time.time() < deadline: time.sleep(0.5)\n"
        )
        self.run(sys.executable, "-c", stop_jobs, self.url, check=False, timeout=60)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    h = RayHead()
    yield h
    h.stop()


def sets(tmp_path: Path, name: str, *extra: str) -> list[str]:
    pairs = [f"output_dir={tmp_path}", f"dataplane.name={name}", "task.eval_prompts=0", "warmup.steps=5",
             "rollout.groups_per_call=4", "dataplane.num_storage_units=1", *extra]  # fmt: skip
    return [arg for p in pairs for arg in ("--set", p)]


def test_submit_runs_the_example_as_a_job_and_its_metrics_are_read(head, tmp_path):
    name = f"job-{uuid.uuid4().hex[:6]}"
    out = head.cli(
        "submit", "examples/sort.yaml", "--address", head.url, *sets(tmp_path, name, "trainer.steps=4")
    )
    job_id = out.stdout.strip()
    assert job_id.startswith("raysubmit_"), out.stdout
    done = head.cli("jobs", "status", job_id, "--address", head.url, "--wait", "300", timeout=330)
    state = yaml.safe_load(done.stdout)
    assert state["status"] == "SUCCEEDED" and state["metadata"]["asyncflow_name"] == name, state
    assert state["entrypoint"].startswith("python -m asyncflow.cli run examples/sort.yaml --set output_dir=")
    logs = head.cli("jobs", "logs", job_id, "--address", head.url).stdout
    assert (
        head.cli("jobs", "logs", job_id, "--address", head.url, "--follow").stdout == logs
    )  # ended: returns
    # `asyncflow run` ends by printing its summary
    (line,) = [x for x in logs.splitlines() if x.startswith("run_dir: ")]
    run_dir = Path(line.removeprefix("run_dir: "))
    assert run_dir.parent == tmp_path and json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["samples"] == 16 * 8 for m in metrics)


def test_a_plain_ray_job_runs_and_ctl_steers_it_from_another_process(head, tmp_path):
    """`ray job submit -- asyncflow run CONFIG`: the run joins the job's cluster; `asyncflow ctl`
    (another process, through Ray) reads its status and stops it with a checkpoint; the job succeeds."""
    name, job_id, out_dir = f"ctl-{uuid.uuid4().hex[:6]}", f"plain-{uuid.uuid4().hex[:6]}", tmp_path
    head.run(str(BIN / "ray"), "job", "submit", "--address", head.url, "--submission-id", job_id, "--no-wait",
             "--working-dir", ".", "--", "asyncflow", "run", "examples/sort.yaml",
             *sets(out_dir, name, "trainer.steps=500"))  # fmt: skip
    ctl = ["ctl", "--name", name, "--address", head.gcs]
    status = yaml.safe_load(head.cli(*ctl, "status", "--wait", "240", timeout=300).stdout)
    assert status["state"] in ("running", "starting") and status["steps"] == 500
    stopped = yaml.safe_load(head.cli(*ctl, "stop", timeout=300).stdout)
    assert Path(stopped["checkpoint"], "state.json").exists()
    wait = ["jobs", "status", job_id, "--address", head.url, "--wait", "120"]
    assert yaml.safe_load(head.cli(*wait, timeout=150).stdout)["status"] == "SUCCEEDED"
    (run_dir,) = out_dir.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_at_step"] == stopped["step"] == summary["steps"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == stopped["step"]


def test_jobs_stop_ends_a_submitted_job(head, tmp_path):
    name = f"stop-{uuid.uuid4().hex[:6]}"
    job_id = head.cli(
        "submit", "examples/sort.yaml", "--address", head.url, *sets(tmp_path, name)
    ).stdout.strip()
    assert head.cli("jobs", "stop", job_id, "--address", head.url).stdout.strip() in (
        "stopped",
        "not running",
    )
    out = head.cli("jobs", "status", job_id, "--address", head.url, "--wait", "60", check=False)
    assert out.returncode == 1 and yaml.safe_load(out.stdout)["status"] == "STOPPED", out.stdout


def test_a_stopped_job_checkpoints_and_the_same_submission_continues_it(head, tmp_path):
    """`jobs stop` sends SIGTERM: the run checkpoints at a step and the job is STOPPED; submitting
    the same command again (--resume-if-exists) continues that run directory to the end."""
    name = f"again-{uuid.uuid4().hex[:6]}"
    submit = ["submit", "examples/sort.yaml", "--address", head.url, "--resume-if-exists",
              *sets(tmp_path, name, "trainer.steps=40", "trainer.checkpoint_every=0")]  # fmt: skip
    job_id = head.cli(*submit).stdout.strip()
    run_dir = tmp_path / "sort"
    deadline = time.monotonic() + 240
    while (
        not (run_dir / "metrics.jsonl").exists()
        or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3
    ):
        assert time.monotonic() < deadline, head.cli("jobs", "logs", job_id, "--address", head.url).stdout
        time.sleep(0.2)
    head.cli("jobs", "stop", job_id, "--address", head.url)
    state = yaml.safe_load(
        head.cli("jobs", "status", job_id, "--address", head.url, "--wait", "90", check=False).stdout
    )
    assert state["status"] == "STOPPED", state
    logs = head.cli("jobs", "logs", job_id, "--address", head.url).stdout
    assert "SIGTERM: stopped at step" in logs, logs[-3000:]
    stopped = json.loads((run_dir / "summary.json").read_text())["stopped_at_step"]
    assert (run_dir / "checkpoints" / f"step_{stopped:07d}" / "state.json").exists()

    again = head.cli(*submit).stdout.strip()
    done = head.cli("jobs", "status", again, "--address", head.url, "--wait", "300", timeout=330)
    assert yaml.safe_load(done.stdout)["status"] == "SUCCEEDED", done.stdout
    logs = head.cli("jobs", "logs", again, "--address", head.url).stdout
    assert f"(step {stopped}," in logs, logs[-3000:]  # resumed from the SIGTERM checkpoint
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 41))
