"""ReferenceWorker: log-probs of the reference policy (the warm-started model, frozen) for
every response (per token, or per denoising step of a flow policy: the kind computes them),
so the trainer can add a KL term. It knows nothing about the loss."""

from __future__ import annotations

import time
from typing import Any

import torch

from workers.samples import PARTITION, REFERENCE, serve, take, work_through

WRITES = ["ref_logprobs"]


class ReferenceWorker:
    def __init__(
        self,
        model: torch.nn.Module,
        store: Any,
        *,
        kind: Any,
        batch_rows: int = 64,
        get_timeout_s: float | None = None,
    ):
        self.model, self.store, self.kind = model.eval(), store, kind
        self.batch_rows, self.get_timeout_s = batch_rows, get_timeout_s
        self.stats: dict[str, float] = {"samples": 0, "busy_s": 0.0, "idle_s": 0.0}

    async def step(self, max_rows: int | None = None, *, wait: bool = True) -> int:
        start = time.perf_counter()
        size = max_rows or self.batch_rows
        batch = await take(
            self.store, self.kind.reference_reads, size, REFERENCE, writes=WRITES, wait=wait,
            timeout_s=self.get_timeout_s,
        )  # fmt: skip
        got = time.perf_counter()
        self.stats["idle_s"] += got - start
        if not len(batch):
            return 0
        ref = self.kind.reference_logprobs(self.model, batch)
        await self.store.put(PARTITION, {"ref_logprobs": ref}, rows=batch)
        await self.store.ack(batch)
        self.stats["samples"] += len(batch)
        self.stats["busy_s"] += time.perf_counter() - got
        return len(batch)

    async def work(self, rows: int) -> int:
        """Process exactly `rows` rows (sync mode)."""
        return await work_through(self.step, rows)

    async def run(self) -> None:
        await serve(self.step)
