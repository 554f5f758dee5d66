"""Spans: what each process spent its time on, as Chrome / Perfetto trace events.

Every process (one per Ray actor) has one `Tracer`, `tracer`, that the workers record into:
`with tracer.span("generate", rows=batch.rows) as args: ...; args["tokens"] = n` records one
complete event (ph "X") with wall-clock start and duration in microseconds, so the tracks of
different processes line up. Events stay in memory (at most `max_events`, the rest counted
as dropped) until `drain()` hands them over as plain dicts (msgpack- and JSON-able); the
workflow drains every actor in the background (about once a second) into the run's trace.json
(asyncflow.rundir), one named track per actor. Off, a span is one attribute test.

A span's args name what it worked on: `row_ids` (the store's rows of a batch; the prompt
source's `admit` span maps them to (prompt, sample)), `rows` (how many), `version` (the
policy version), byte and token counts. The module knows nothing about workers, Ray or the store.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Tracer", "breakdown", "metadata", "traced", "tracer"]


class _Span:
    """One span being recorded: its args are the dict `with ... as args` binds."""

    __slots__ = ("tracer", "name", "args", "start")

    def __init__(self, tracer: Tracer, name: str, args: dict[str, Any]):
        self.tracer, self.name, self.args = tracer, name, args
        self.start = 0

    def __enter__(self) -> dict[str, Any]:
        self.start = time.time_ns()
        self.tracer._open[id(self)] = self
        return self.args

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        self.tracer._open.pop(id(self), None)
        if kind is not None:
            self.args["error"] = kind.__name__
        self.tracer.complete(self.name, self.start, time.time_ns(), **self.args)


class _Off:
    """The span of a tracer that is off: binds a throw-away dict, records nothing."""

    __slots__ = ()

    def __enter__(self) -> dict[str, Any]:
        return {}

    def __exit__(self, *exc: Any) -> None:
        return None


_OFF = _Off()


class Tracer:
    """The spans of one process, buffered until drained."""

    def __init__(self, enabled: bool = True, max_events: int = 100_000):
        self.enabled, self.max_events = enabled, max_events
        self.dropped = 0  # events not kept since the last drain: the buffer was full
        self._events: list[dict[str, Any]] = []
        self._open: dict[int, _Span] = {}  # spans begun and not yet ended: the calls in flight

    def configure(self, enabled: bool, max_events: int) -> None:
        self.enabled, self.max_events = enabled, max_events

    def span(self, name: str, **args: Any) -> _Span | _Off:
        """A context manager timing its block as one event named `name` with `args` (the dict it
        binds: add to it inside the block). An exception leaving the block is noted as args.error."""
        return _Span(self, name, args) if self.enabled else _OFF

    def complete(self, name: str, start_ns: int, end_ns: int, **args: Any) -> None:
        """Record a span measured elsewhere, from wall-clock `start_ns` to `end_ns` (time.time_ns())."""
        if not self.enabled:
            return
        if len(self._events) >= self.max_events:
            self.dropped += 1
            return
        self._events.append(
            {
                "name": name,
                "ph": "X",
                "ts": start_ns // 1000,
                "dur": (end_ns - start_ns) // 1000,
                "args": args,
            }
        )

    def instant(self, name: str, **args: Any) -> None:
        """Record a moment (ph "i"), e.g. a version becoming visible."""
        if not self.enabled:
            return
        if len(self._events) >= self.max_events:
            self.dropped += 1
            return
        self._events.append({"name": name, "ph": "i", "s": "t", "ts": time.time_ns() // 1000, "args": args})

    def in_flight(self) -> list[dict[str, Any]]:
        """The spans begun and not ended, oldest first: what the process is doing now (its name,
        seconds so far, args such as row_ids). A watchdog's diagnosis of a stuck actor shows them."""
        now = time.time_ns()
        spans = sorted(self._open.values(), key=lambda span: span.start)
        return [{"name": s.name, "for_s": round((now - s.start) / 1e9, 3), **s.args} for s in spans]

    def drain(self) -> list[dict[str, Any]]:
        """The events recorded since the last drain (and one `trace.dropped` instant if the buffer
        overflowed meanwhile); the buffer starts empty again."""
        events, self._events = self._events, []
        if self.dropped:
            events.append(
                {"name": "trace.dropped", "ph": "i", "s": "t", "ts": time.time_ns() // 1000,
                 "args": {"events": self.dropped, "max_events": self.max_events}}
            )  # fmt: skip
            self.dropped = 0
        return events


# The process's tracer: each Ray actor is its own process, so each has its own. It starts off (a
# process that uses workers without a host collects nothing); hosts configure it from the run's
# `trace` section before they build their worker.
tracer = Tracer(enabled=False)


def traced(name: str, args: Callable[..., dict[str, Any]] | None = None) -> Callable:
    """Decorate an async method so each call is one span `name`; `args(*call_args)` (without self)
    gives the span's args, e.g. `traced("reward", lambda batch: {"rows": batch.rows})`."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        async def call(self: Any, *a: Any, **kw: Any) -> Any:
            if not tracer.enabled:
                return await method(self, *a, **kw)
            with tracer.span(name, **(args(*a, **kw) if args else {})):
                return await method(self, *a, **kw)

        return call

    return wrap


def metadata(pid: int, name: str, sort_index: int | None = None) -> list[dict[str, Any]]:
    """The metadata events that make `pid` one named track ("rollout 0", "trainer rank 0", ...)."""
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}},
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}},
    ]
    if sort_index is not None:
        events.append(
            {
                "name": "process_sort_index",
                "ph": "M",
                "pid": pid,
                "tid": 0,
                "args": {"sort_index": sort_index},
            }
        )
    return events


def breakdown(spans: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, float]:
    """Seconds per role and span name, `time/<role>/<name>`, summed over the (role, event) pairs
    given (complete events only; several workers of a role add up)."""
    out: dict[str, float] = {}
    for role, event in spans:
        if event.get("ph") == "X":
            key = f"time/{role}/{event['name']}"
            out[key] = out.get(key, 0.0) + event["dur"] / 1e6
    return {k: round(v, 6) for k, v in sorted(out.items())}
