"""A run's trace: every actor's spans, drained after each step into the run directory.

Each host actor records spans in its process (asyncflow.tracing) and hands them over on
`trace()` with its role and its track (a fixed number per actor: 1000 the prompt source,
2000 + rank the trainer ranks, 3000 + i rollout worker i, 4000 + i reward worker i, 5000 the
reference). `Traces.collect` asks every actor at once, appends the events to trace.json
(the first time a track shows, with the metadata that names it), sends them to an
OpenTelemetry collector when one is configured, and returns the seconds per role and span
(`time/<role>/<span>`) for the step's metrics line. A slow or dead actor's spans wait for the
next collection: tracing never stops a run.
"""

from __future__ import annotations

import asyncio
from typing import Any

from asyncflow.config import TraceConfig
from asyncflow.rundir import RunDir
from asyncflow.tracing import breakdown, metadata


class Traces:
    def __init__(self, config: TraceConfig, run: RunDir, timeout_s: float = 5.0):
        self.config, self.run, self.timeout_s = config, run, timeout_s
        self.named: set[int] = set()  # tracks whose names trace.json already has
        self.otlp: Any = None
        if config.enabled and config.otlp_endpoint:
            from asyncflow.workflow.otlp import OtlpExport

            self.otlp = OtlpExport(config.otlp_endpoint, service=run.path.name)
        self._asked: dict[Any, asyncio.Future] = {}  # actor -> its trace() call still on its way

    async def collect(self, actors: list[Any]) -> dict[str, float]:
        """Drain `actors` (host actor handles) into trace.json; the seconds per role and span."""
        if not self.config.enabled:
            return {}
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
        return self.write(replies)

    def write(self, replies: list[dict]) -> dict[str, float]:
        """Hosts' trace() replies into trace.json (and the collector); their time breakdown."""
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

    def close(self) -> None:
        """The run ended: trace.json becomes a closed JSON array; the collector gets what is left."""
        for call in self._asked.values():
            call.cancel()
        self._asked.clear()
        if self.config.enabled:
            self.run.close_trace()
        if self.otlp is not None:
            self.otlp.close()


async def _ask(actor: Any) -> dict:
    return await actor.trace.remote()
