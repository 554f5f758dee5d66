"""ReferenceWorker: log-probs of the reference policy (the warm-started model, frozen) for
every response (per token, or per denoising step of a flow policy: the kind computes them),
so the trainer can add a KL term. It knows nothing about the loss."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from asyncflow.tracing import traced
from workers.samples import REFERENCE, fill, idle, serve, take, work_through

if TYPE_CHECKING:  # the seams' protocols and classes, for the type checker
    from dataplane.client import StoreClient
    from workers.kinds import Kind

WRITES = ["ref_logprobs"]


class ReferenceWorker:
    def __init__(
        self,
        model: torch.nn.Module,
        store: StoreClient,
        *,
        kind: Kind,
        batch_rows: int = 64,
        get_timeout_s: float | None = None,
    ):
        self.model, self.store, self.kind = model.eval(), store, kind
        self.batch_rows, self.get_timeout_s = batch_rows, get_timeout_s
        self.stats: dict[str, float] = {"samples": 0, "busy_s": 0.0, "idle_s": 0.0}

    async def step(self, max_rows: int | None = None) -> int:
        """Score up to `max_rows` ready rows (sync mode); returns how many (0: the stream ended)."""
        start = time.perf_counter()
        size = max_rows or self.batch_rows
        batch = await take(
            self.store, self.kind.reference_reads, size, REFERENCE, writes=WRITES,
            timeout_s=self.get_timeout_s,
        )  # fmt: skip
        self.stats["idle_s"] += time.perf_counter() - start
        if not len(batch):
            return 0
        await self.process(batch)
        await self.store.ack(batch)
        return len(batch)

    @traced("reference", lambda batch: {"row_ids": batch.rows})
    async def process(self, batch: Any) -> None:
        """Write the reference log-probs of a batch (the caller acks it)."""
        start = time.perf_counter()
        ref = self.kind.reference_logprobs(self.model, batch)
        await fill(self.store, {"ref_logprobs": ref}, batch)
        self.stats["samples"] += len(batch)
        self.stats["busy_s"] += time.perf_counter() - start

    async def work(self, rows: int) -> int:
        """Process exactly `rows` rows (sync mode)."""
        return await work_through(self.step, rows)

    async def run(self) -> None:
        """Score rows as they become ready until the stream ends (async mode)."""
        await serve(
            self.store, self.kind.reference_reads, self.batch_rows, REFERENCE, idle(self.stats, self.process),
            writes=WRITES, timeout_s=self.get_timeout_s,
        )  # fmt: skip
