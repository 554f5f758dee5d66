"""Screening: a trainer step's groups under dynamic sampling (trainer.dynamic_sampling).

The step reads whole groups from the store as they become ready and keeps those whose rewards
differ (asyncflow.algorithms.dynamic_sampling). A group whose rewards are all equal is dropped:
one row goes to the DROPPED partition for it, then its rows are acked, so the trainer consumes
them exactly once and never trains them, and the source (workers.source), reading DROPPED,
admits a new prompt in its place. The step goes on reading until it holds `groups` groups with
signal, renewing the lease of those it holds while it waits. Past `max_drops` dropped groups
it fails with an error that names the option, rather than wait forever on a task whose rewards
never vary. Screening knows nothing about models, losses or how prompts are admitted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from asyncflow.algorithms.dynamic_sampling import split_by_signal
from asyncflow.errors import StoreTimeout, WorkerError
from asyncflow.tracing import tracer
from workers.samples import DROPPED, PARTITION, TRAINER

if TYPE_CHECKING:
    from dataplane.batch import Batch
    from dataplane.client import StoreClient


@dataclass
class Screened:
    """What a step read: the groups it trains (leased: acked with the step) and those it dropped
    (acked already)."""

    batch: Batch
    dropped: list[list[int]] = field(default_factory=list)  # (prompt, sample) of each dropped row
    dropped_groups: int = 0


async def take_with_signal(
    store: StoreClient, fields: Sequence[str], groups: int, n: int, *, v_min: int, version: int,
    max_drops: int, timeout_s: float | None = None,
) -> Screened:  # fmt: skip
    """`groups` whole groups of `n` rows whose rewards differ, at versions >= `v_min`; every uniform
    group read meanwhile is dropped (noted in DROPPED with the trainer's `version`, then acked)."""
    kept: Batch | None = None
    dropped: list[list[int]] = []
    have = dropped_groups = 0
    while have < groups:
        batch = await _get(store, fields, (groups - have) * n, n, v_min, kept, timeout_s)
        keep, drop = split_by_signal(batch.groups, [float(r) for r in batch["reward"]])
        if drop:
            gone = batch.select(drop)
            dropped_groups += len(set(gone.groups))
            _check_bound(dropped_groups, max_drops)
            await _drop(store, gone, version)
            dropped += [[int(p), int(s)] for p, s in zip(gone["prompt_index"], gone["sample_index"])]
        if keep:
            part = batch.select(keep)
            kept = part if kept is None else kept + part
            have += len(set(part.groups))
    assert kept is not None
    return Screened(kept, dropped, dropped_groups)


async def _get(
    store: StoreClient, fields: Sequence[str], size: int, n: int, v_min: int, held: Batch | None,
    timeout_s: float | None,
) -> Batch:  # fmt: skip
    """Up to `size` rows of whole groups (at least one group), waiting for them; while waiting,
    the lease of the groups already `held` is renewed every third of it."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        limits = [] if deadline is None else [deadline - time.monotonic()]
        if held is not None and held.lease_s < float("inf"):
            limits.append(held.lease_s / 3)
        wait_s = max(0.001, min(limits)) if limits else None
        try:
            with tracer.span("store.get", v_min=v_min) as span:
                got = store.stats.bytes_got
                batch = await store.get(
                    PARTITION, fields, size, TRAINER, sampler="group", v_min=v_min, min_rows=n,
                    timeout_s=wait_s,
                )  # fmt: skip
                span.update(rows=len(batch), bytes=store.stats.bytes_got - got)
            return batch
        except StoreTimeout:
            if held is None or (deadline is not None and time.monotonic() >= deadline):
                raise
            await store.renew(held)


def _check_bound(dropped_groups: int, max_drops: int) -> None:
    if dropped_groups > max_drops:
        raise WorkerError(
            f"trainer.dynamic_sampling dropped {dropped_groups} groups in one step, more than "
            f"trainer.max_dropped_batches x batch_prompts = {max_drops}: the rewards of every sample of a "
            "prompt came out equal (the task is too easy or too hard for the policy, or the reward is "
            "constant). Check the reward function and rollout.temperature, raise "
            "trainer.max_dropped_batches, or set trainer.dynamic_sampling: false"
        )


async def _drop(store: StoreClient, batch: Batch, version: int) -> None:
    """Consume the rows of uniform groups without training them: a DROPPED row per group first (so
    a slot is never lost), then the ack. The span names the rows (a sample's life ends "dropped")."""
    prompts = list(dict(zip(batch.groups, (int(p) for p in batch["prompt_index"]))).values())
    with tracer.span("drop_groups", held=version, groups=len(prompts), row_ids=batch.rows):
        await store.put(DROPPED, {"prompt_index": prompts, "version": [version] * len(prompts)})
        await store.ack(batch)
