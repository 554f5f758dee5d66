"""The Ray runtime a run needs: join the cluster named by RAY_ADDRESS, or start Ray here
with enough logical CPUs for the run's actors; the run's placement group (trainer ranks, and
rollout workers colocated with them); what to say when the cluster has no room; and
ending the driver's own loops for certain (`cancel_all`)."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
from collections.abc import Iterable
from typing import Any

import ray

from asyncflow.config import AsyncFlowConfig
from asyncflow.config.resources import asked_by, said
from asyncflow.errors import ConfigError

log = logging.getLogger("asyncflow")


def cpus_needed(config: AsyncFlowConfig) -> float:
    """Logical CPUs the run's actors reserve (Ray must offer at least this many)."""
    return config.resources_needed()["CPU"]


def missing_here(
    config: AsyncFlowConfig, have: dict[str, float], where: str = "this machine", cpus: bool = False
) -> str:
    """What the run asks for that a Ray of `have` (its total resources) cannot give, as a message
    says it, naming the fields; "" when nothing is missing. CPUs count only with `cpus`: a Ray
    started here offers as many as the run needs."""
    short = []
    for name, amount in config.resources_needed().items():
        if (name != "CPU" or cpus) and amount > have.get(name, 0.0) + 1e-9:
            scale, unit = (2**30, " GiB") if name == "memory" else (1, "")
            shown = f"{amount / scale:g}{unit} {name}"
            asked = asked_by(config.roles(), name)
            short.append(f"{shown} (asked by {asked}; {where} has {have.get(name, 0.0) / scale:.3g}{unit})")
    return "; ".join(short)


def init_ray(config: AsyncFlowConfig) -> None:
    """Join RAY_ADDRESS if set, else start Ray here with enough logical CPUs for the run."""
    if ray.is_initialized():
        warn_if_missing(config)
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
        warn_if_missing(config)
        return
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed(config)))
    # Ray starts workers at niceness 15; here they are the job, not background work, and at 15
    # anything else on a shared machine starves them.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    missing = missing_here(config, ray.cluster_resources())
    if missing:  # nothing will add a node here: waiting for start_timeout_s would only delay this
        ray.shutdown()
        raise ConfigError(
            f"the run needs {missing}. Lower those fields (num_gpus: 0 runs a role on "
            "the CPU), or run where they exist: on a Ray cluster with such nodes (RAY_ADDRESS, or "
            "`asyncflow submit`)"
        )


def warn_if_missing(config: AsyncFlowConfig) -> None:
    """On a Ray this process joined, what the cluster lacks now is not refused (an autoscaler may
    add a node), but said at once rather than after start_timeout_s."""
    missing = missing_here(config, ray.cluster_resources(), where="the cluster", cpus=True)
    if missing:
        log.warning(
            "the run needs %s. It waits up to start_timeout_s = %g s for nodes that have them (an "
            "autoscaler adding some), then fails; lower those fields, or add such nodes",
            missing, config.start_timeout_s,
        )  # fmt: skip


def free_cpus(asked: Iterable[str] = ()) -> str:
    """The cluster's free and total CPUs, and of the other resources `asked` for (and GPUs, where
    it has any), as a message says them: a GPU asked of a cluster without one shows as 0 of 0."""
    free, total = ray.available_resources(), ray.cluster_resources()
    kinds = list(dict.fromkeys(["CPU", *(["GPU"] if total.get("GPU") else []), *asked]))
    return "the cluster has " + ", ".join(
        f"{free.get(k, 0.0):g} of its {total.get(k, 0.0):g} {k}{'s' * (k in ('CPU', 'GPU'))} free"
        for k in kinds
    )


def placement_group(config: AsyncFlowConfig) -> Any:
    """The run's placement group (`AsyncFlowConfig.bundles`: the trainer ranks, and the rollout
    workers colocated with them), its bundles packed onto few nodes; None where it has none."""
    bundles = config.bundles()
    if not bundles:
        return None
    from ray.util.placement_group import placement_group as make

    return make(bundles, strategy="PACK", name=f"{config.dataplane.name}.placement")


def in_bundle(group: Any, index: int) -> dict:
    """The actor options that place an actor in bundle `index` of `group`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
    }


def group_found_no_room(config: AsyncFlowConfig, timeout_s: float) -> str:
    """Why the run fails when its placement group (`AsyncFlowConfig.bundles`) was not placed in
    time: its bundles, what the cluster has free, and the fields to change."""
    bundles, t = config.bundles(), config.trainer
    asked = dict.fromkeys(k for b in bundles for k in b if k != "memory")
    if config.placement == "split":
        what, fix = f"trainer.num_ranks = {t.num_ranks} ranks of {t.asks()} each", "add nodes, or lower them"
    else:
        kinds = collections.Counter(said(b) for b in bundles)
        what = "placement = 'colocated': bundles of a trainer rank and a rollout worker together, " + (
            ", ".join(f"{n} x ({b})" for b, n in kinds.items())
        )
        fix = (
            "add nodes with room for a whole bundle, ask for less (trainer, rollout), or set placement: split"
        )
    return f"{what} found no room within {timeout_s:.0f} s (start_timeout_s; {free_cpus(asked)}); {fix}"


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


ROLE_SECTIONS = {"the trainer": "trainer", "trainer rank": "trainer", "rollout worker": "rollout",
                 "reward worker": "reward"}  # fmt: skip


def asks_of(config: AsyncFlowConfig, role: str) -> Any:
    """The config section whose resources a role's actor ("rollout worker 1", ...) asked for
    (None: the prompt source's 0.1 CPUs)."""
    section = ROLE_SECTIONS.get(role.rstrip("0123456789 "))
    return getattr(config, section) if section else None


def no_room(config: AsyncFlowConfig, role: str) -> bool:
    """Whether no node has free what the role's actor asks for. An actor Ray has not placed yet
    may only be waiting for its worker process (slow on a loaded machine) while its ask fits."""
    section = asks_of(config, role)
    ask = section.bundle() if section is not None else {"CPU": 0.1}
    try:
        from ray._private.state import available_resources_per_node

        nodes = list(available_resources_per_node().values())
    except Exception:  # an internal API: if it changes, judge by the whole cluster's free resources
        nodes = [ray.available_resources()]
    return not any(all(node.get(k, 0.0) >= v for k, v in ask.items()) for node in nodes)


def not_started(config: AsyncFlowConfig, unplaced: list[str], starting: list[str], timeout_s: float) -> str:
    """Why the run fails when actors did not start within timeout_s: those Ray could not place
    (roles: "the trainer", "rollout worker 1", ...) with what each asked for and what the
    cluster has free, and those placed but still starting."""
    asks = ", ".join(
        f"{role} ({s.asks() if (s := asks_of(config, role)) is not None else '0.1 CPUs'})"
        for role in unplaced
    )
    kinds = [role.rstrip("0123456789 ") for role in unplaced]
    asked = [
        k for r in unplaced if (s := asks_of(config, r)) is not None for k in s.bundle() if k != "memory"
    ]
    sections = dict.fromkeys(ROLE_SECTIONS[k] for k in kinds if k in ROLE_SECTIONS)
    fields = "; ".join(
        f"{s}.num_cpus / num_gpus / memory_gb / resources"
        + (f" or {s}.num_workers" if s != "trainer" else "")
        for s in sections
    )
    slow = f"still starting: {', '.join(starting)}" if starting else ""
    if not unplaced:
        return (
            f"the run's actors did not start within {timeout_s:.0f} s (start_timeout_s), though Ray placed "
            f"them: {slow}. Raise start_timeout_s if they are only slow (a large model loading), or "
            "look at their logs"
        )
    return (
        f"the cluster found no room within {timeout_s:.0f} s (start_timeout_s) for {asks}; {free_cpus(asked)}"
        f"{'; ' + slow if slow else ''}. Add nodes (or let the autoscaler), or lower what they ask for: "
        f"{fields or 'the roles named'}"
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
