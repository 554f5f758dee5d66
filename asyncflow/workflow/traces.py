"""A run's trace: every actor's spans, collected in the background into the run directory.

Each host actor records spans in its process (asyncflow.tracing) and hands them over on
`trace()` with its role and its track (a fixed number per actor: 1000 the prompt source,
2000 + rank the trainer ranks, 3000 + i rollout worker i, 4000 + i reward worker i, 5000 the
reference). After a step, `Traces.step` starts a collection if the last one has finished and
`trace.collect_every_s` has passed: it asks every actor at once, appends the events to
trace.json (the first time a track shows, with the metadata that names it) and sends them to
an OpenTelemetry collector when one is configured. The loop never waits for it: a step costs
the actors their spans (microseconds each) and the driver one check. Each step's metrics line
gets the latest collection's seconds per role and span, per step of its window
(`time/<role>/<span>`). A slow or dead actor's spans wait for a later collection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from asyncflow.config import TraceConfig
from asyncflow.rundir import RunDir
from asyncflow.tracing import breakdown, metadata

log = logging.getLogger("asyncflow")


class Traces:
    def __init__(self, config: TraceConfig, run: RunDir, timeout_s: float = 30.0):
        self.config, self.run, self.timeout_s = config, run, timeout_s
        self.named: set[int] = set()  # tracks whose names trace.json already has
        self.otlp: Any = None
        if config.enabled and config.otlp_endpoint:
            from asyncflow.workflow.otlp import OtlpExport

            self.otlp = OtlpExport(config.otlp_endpoint, service=run.path.name)
        self.per_step: dict[str, float] = {}  # the latest collection's time/<role>/<span> per step
        self.steps = 0  # steps since the running (or last) collection started
        self._asked: dict[Any, asyncio.Future] = {}  # actor -> its trace() call still on its way
        self.in_flight: dict[Any, list[dict]] = {}  # actor -> its open spans at the last collection
        self._collecting: asyncio.Future | None = None
        self._started = -float("inf")  # time.monotonic() of the last collection's start

    def step(self, actors: list[Any]) -> dict[str, float]:
        """A step ended: start a collection from `actors` (host actor handles) when one is due;
        the latest per-step time breakdown."""
        if not self.config.enabled:
            return {}
        self.steps += 1
        running = self._collecting is not None and not self._collecting.done()
        if not running and time.monotonic() - self._started >= self.config.collect_every_s:
            self._started = time.monotonic()
            self._collecting = asyncio.ensure_future(self._collect(actors, self.steps))
            self._collecting.add_done_callback(_log_failure)
            self.steps = 0
        return self.per_step

    async def _collect(self, actors: list[Any], steps: int) -> None:
        for actor in actors:
            if actor not in self._asked:  # one call per actor at a time: a slow one is asked once
                self._asked[actor] = asyncio.ensure_future(_ask(actor))
        await asyncio.wait(list(self._asked.values()), timeout=self.timeout_s)
        replies = []
        for actor, call in list(self._asked.items()):
            if call.done():
                del self._asked[actor]
                if call.exception() is None:  # a dead actor's spans died with it
                    replies.append(call.result())
                    self.in_flight[actor] = replies[-1].get("in_flight", [])
        seconds = self.write(replies)
        self.per_step = {k: round(v / max(steps, 1), 6) for k, v in seconds.items()}

    def write(self, replies: list[dict]) -> dict[str, float]:
        """Hosts' trace() replies into trace.json (and the collector); their seconds per role and span."""
        events: list[dict] = []
        for reply in replies:
            track = reply["track"]
            if track not in self.named:
                self.named.add(track)
                events += metadata(track, reply["name"], sort_index=track)
            for event in reply["events"]:
                event["pid"], event["tid"] = track, 0
            events += reply["events"]
        self.run.append_trace(events)
        if self.otlp is not None:
            self.otlp.export(replies)
        return breakdown((reply["role"], event) for reply in replies for event in reply["events"])

    async def close(self, actors: list[Any]) -> None:
        """The run ended: collect what is left, close trace.json's array, flush the collector."""
        if not self.config.enabled:
            return
        if self._collecting is not None:
            await asyncio.wait([self._collecting])
        await self._collect(actors, self.steps)
        for call in self._asked.values():
            call.cancel()
        self._asked.clear()
        self.run.close_trace()
        if self.otlp is not None:
            self.otlp.close()


async def _ask(actor: Any) -> dict:
    return await actor.trace.remote()


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:  # e.g. a full disk: the run goes on
        log.warning("trace collection failed: %s", task.exception())
