"""The Ray runtime a run needs: join the cluster named by RAY_ADDRESS, or start Ray here
with enough logical CPUs for the run's actors; what to say when the cluster has no room; and
ending the driver's own loops for certain (`cancel_all`)."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Iterable
from typing import Any

import ray

from asyncflow.config import AsyncFlowConfig
from asyncflow.errors import ConfigError


def cpus_needed(config: AsyncFlowConfig) -> float:
    """Logical CPUs the run's actors reserve (Ray must offer at least this many)."""
    d = config.dataplane
    return (
        config.trainer.num_cpus * config.trainer.num_ranks
        + config.rollout.num_cpus * config.rollout.num_workers
        + config.reward.num_cpus * config.reward.num_workers
        + (config.reference.num_cpus if config.reference.enabled else 0)
        + 0.2  # source and weight store
        + d.controller_num_cpus
        + d.storage_num_cpus * d.num_storage_units
    )


def init_ray(config: AsyncFlowConfig) -> None:
    """Join RAY_ADDRESS if set, else start Ray here with enough logical CPUs for the run."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        try:
            ray.init()
        except ray.exceptions.AuthenticationError:
            raise ConfigError(
                f"the Ray cluster at RAY_ADDRESS={address} requires token authentication and refused this "
                "process: set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH (`ray get-auth-token` on the head node prints it)"
            ) from None
        except ConnectionError as e:
            raise ConfigError(
                f"cannot join the Ray cluster at RAY_ADDRESS={address} ({e}); check the address and that "
                "the cluster runs, or unset RAY_ADDRESS to start Ray on this machine"
            ) from None
        return
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed(config)))
    # Ray starts workers at niceness 15; here they are the job, not background work, and at 15
    # anything else on a shared machine starves them.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)


def free_cpus() -> str:
    """The cluster's free and total CPUs, as a message says them."""
    free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
    return f"the cluster has {free:g} of its {total:g} CPUs free"


def placed(actor: Any) -> bool:
    """Whether Ray has placed the actor on a node (False: it still waits for resources). Read from
    Ray's actor table (what RuntimeContext.was_current_actor_reconstructed reads too): it needs no
    dashboard, unlike ray.util.state. Unknown counts as placed."""
    try:
        from ray._private.state import actors

        info = actors(actor_id=actor._actor_id.hex())
    except Exception:  # an internal API: if it changes, the message only gets less precise
        return True
    return not info or info.get("State") not in ("PENDING_CREATION", "DEPENDENCIES_UNREADY")


def not_started(config: AsyncFlowConfig, unplaced: list[str], starting: list[str], timeout_s: float) -> str:
    """Why the run fails when actors did not start within timeout_s: those Ray could not place
    (roles: "the trainer", "rollout worker 1", ...) with the CPUs each asked for and what the
    cluster has free, and those placed but still starting."""
    cpus = {"the prompt source": 0.1, "the trainer": config.trainer.num_cpus,
            "trainer rank": config.trainer.num_cpus, "rollout worker": config.rollout.num_cpus,
            "reward worker": config.reward.num_cpus}  # fmt: skip
    asks = ", ".join(f"{role} ({cpus.get(role.rstrip('0123456789 '), 0):g} CPUs)" for role in unplaced)
    slow = f"still starting: {', '.join(starting)}" if starting else ""
    if not unplaced:
        return (
            f"the run's actors did not start within {timeout_s:.0f} s (start_timeout_s), though Ray placed "
            f"them: {slow}. Raise start_timeout_s if they are only slow (a large model loading), or "
            "look at their logs"
        )
    return (
        f"the cluster found no room within {timeout_s:.0f} s (start_timeout_s) for {asks}; {free_cpus()}"
        f"{'; ' + slow if slow else ''}. Add nodes (or let the autoscaler), or lower trainer.num_cpus, "
        "rollout.num_workers / rollout.num_cpus, reward.num_workers / reward.num_cpus"
    )


async def names_free(prefix: str, timeout_s: float = 30.0) -> None:
    """Wait until Ray has let go of the actor names that start with `prefix` (a run's), so that a
    restart can take them again."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        if not any(n.startswith(prefix) for n in names):
            return
        await asyncio.sleep(0.1)


async def cancel_all(tasks: Iterable[asyncio.Future], every_s: float = 1.0) -> None:
    """Cancel `tasks` and return once every one has ended, cancelling again each `every_s` the
    ones still running. Once is not always enough on Python 3.11: asyncio.wait_for swallows a
    cancellation that arrives as the call it waits on completes (CPython gh-86296, fixed in 3.12),
    so a loop caught there goes on, and a plain cancel-then-gather waits for it forever."""
    tasks = list(tasks)
    running = {t for t in tasks if not t.done()}
    while running:
        for task in running:
            task.cancel()
        _, running = await asyncio.wait(running, timeout=every_s)
    await asyncio.gather(*tasks, return_exceptions=True)  # their errors, seen: none is logged later
