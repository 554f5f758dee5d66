"""Ray Job Submission: run a config on an existing Ray cluster, then follow the job.

`submit` validates the config here (a typo fails before anything is sent), then asks the
cluster's job server (the Ray dashboard, http://HOST:8265) to run `asyncflow run CONFIG`
(as `python -m asyncflow.cli run CONFIG`)
with the working directory (the project: its code, the config, custom tasks and rewards)
and `deploy.ray`'s packages and variables carried by the job's runtime environment. In the
job RAY_ADDRESS is set, so `asyncflow run` joins the cluster rather than starting a Ray of
its own (asyncflow.workflow.init_ray); plain `ray job submit --working-dir . -- asyncflow run
CONFIG` runs the same job. The job server's address comes from `address`, else from
RAY_API_SERVER_ADDRESS or RAY_ADDRESS, as with the `ray job` commands.
"""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from asyncflow.config import load_config
from asyncflow.errors import ConfigError, ControlError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ControlError(
            f"cannot reach a Ray job server at {address or '(RAY_API_SERVER_ADDRESS / RAY_ADDRESS)'} "
            f"({str(e).rstrip('.')}). "
            "Pass the dashboard's address (http://HOST:8265) and check that the cluster is up; on a "
            "cluster with token authentication set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"
        ) from None


def entrypoint(
    config_path: str, overrides: list[str] | tuple[str, ...], *, resume: str | None = None,
    resume_if_exists: bool = False,
) -> str:  # fmt: skip
    """The job's command: `python -m asyncflow.cli run ...` (the `asyncflow` script may not be on
    the PATH of the cluster's job driver; the Python that runs the job has the package)."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    if resume:
        return shlex.join(["python", "-m", "asyncflow.cli", "run", "--resume", resume, *sets])
    again = ["--resume-if-exists"] if resume_if_exists else []
    return shlex.join(["python", "-m", "asyncflow.cli", "run", config_path, *again, *sets])


def submit(
    config_path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    address: str | None = None,
    working_dir: str | Path = ".",
    submission_id: str | None = None,
    resume: str | None = None,
    resume_if_exists: bool = False,
) -> str:
    """Submit `asyncflow run CONFIG` as a Ray job; returns its submission id. `resume`: continue the
    run directory RESUME (a path on the cluster) instead; `resume_if_exists`: the job runs
    `asyncflow run CONFIG --resume-if-exists` (stable run directory, continued when it exists)."""
    stable = ["run_dir_mode=stable"] if resume_if_exists else []
    config = load_config(config_path, [*overrides, *stable])  # fails here, before anything is sent
    root, path = Path(working_dir).resolve(), Path(config_path).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(
            f"config {str(config_path)!r} is not inside the working directory {str(root)!r}, which is "
            "what travels to the cluster; move it there or pass --working-dir a folder that holds it"
        )
    ray_env = config.deploy.ray
    env: dict[str, Any] = {"working_dir": str(root), "excludes": list(ray_env.excludes)}
    if ray_env.pip:
        env["pip"] = list(ray_env.pip)
    # `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default):
    # give the run its grace period to take a final checkpoint.
    stop_wait = str(math.ceil(config.sigterm_grace_s) + 5)
    env["env_vars"] = {"RAY_JOB_STOP_WAIT_TIME_S": stop_wait, **ray_env.env_vars}
    return job_client(address).submit_job(
        entrypoint=entrypoint(
            path.relative_to(root).as_posix(), overrides, resume=resume, resume_if_exists=resume_if_exists
        ),
        runtime_env=env,
        submission_id=submission_id,
        entrypoint_num_cpus=ray_env.entrypoint_num_cpus or None,
        metadata={"asyncflow_run": config.run_name, "asyncflow_name": config.dataplane.name},
    )


def status(job_id: str, address: str | None = None) -> dict:
    """The job's status, message, entrypoint, metadata and times."""
    client = job_client(address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as e:
        raise ControlError(f"no job {job_id!r} on that cluster ({e}); `ray job list` shows them") from None
    return {
        "job_id": job_id,
        "status": str(info.status.value),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "metadata": dict(info.metadata or {}),
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def wait(job_id: str, address: str | None = None, timeout_s: float = 3600.0, poll_s: float = 1.0) -> dict:
    """Poll until the job has ended (or timeout_s passed); returns its status."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = status(job_id, address)
        if state["status"] in TERMINAL or time.monotonic() >= deadline:
            return state
        time.sleep(poll_s)


def logs(job_id: str, address: str | None = None, follow: bool = False) -> Iterator[str]:
    """The job's output so far, or (follow) as it is written until the job ends."""
    client = job_client(address)
    if not follow:
        yield client.get_job_logs(job_id)
        return
    import asyncio

    stream = client.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop(job_id: str, address: str | None = None) -> bool:
    """Ask Ray to end the job (SIGTERM: the run checkpoints at its next step within
    sigterm_grace_s, then SIGKILL); True if it was running. The run continues from its last
    checkpoint with --resume (or --resume-if-exists)."""
    return bool(job_client(address).stop_job(job_id))
