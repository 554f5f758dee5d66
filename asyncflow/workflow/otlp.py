"""The run's spans, also sent to an OpenTelemetry collector (trace.otlp_endpoint), as OTLP/HTTP.

Each actor's drained events (asyncflow.tracing: Chrome "X" events, wall-clock microseconds)
become OpenTelemetry spans with the same start and end, under one service named after the
run; the actor is the span's `asyncflow.track` attribute and its role `asyncflow.role`. A
span inside another of the same actor (a train step's forward_backward, optimizer, publish)
is its child. The SDK's batch processor sends them from a thread of its own, so the run
never waits for the collector. Needs the `otel` extra (opentelemetry-sdk and its OTLP/HTTP
exporter).
"""

from __future__ import annotations

from typing import Any

from asyncflow.errors import ConfigError


class OtlpExport:
    def __init__(self, endpoint: str, service: str):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise ConfigError(
                f"trace.otlp_endpoint = {endpoint!r} needs OpenTelemetry's SDK and OTLP/HTTP exporter; "
                "install them (pip install 'asyncflow-rl[otel]') or unset trace.otlp_endpoint"
            ) from None
        self.provider = TracerProvider(resource=Resource.create({"service.name": f"asyncflow {service}"}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("asyncflow")

    def export(self, replies: list[dict]) -> None:
        """Hosts' trace() replies (events already on their tracks) as spans."""
        for reply in replies:
            spans = sorted(
                (e for e in reply["events"] if e.get("ph") == "X"), key=lambda e: (e["ts"], -e["dur"])
            )
            base = {"asyncflow.track": reply["name"], "asyncflow.role": reply["role"]}
            self._nest(spans, base)

    def _nest(self, events: list[dict], base: dict[str, Any]) -> None:
        """One actor's events, sorted by start: each is the child of the latest still-open one
        that contains it."""
        from opentelemetry import trace

        open_: list[tuple[int, Any]] = []  # (end in µs, span) of the enclosing spans
        for e in events:
            end = e["ts"] + e["dur"]
            while open_ and open_[-1][0] < end:
                open_.pop()
            parent = trace.set_span_in_context(open_[-1][1]) if open_ else None
            span = self.tracer.start_span(
                e["name"],
                context=parent,
                start_time=e["ts"] * 1000,
                attributes={**base, **_attributes(e["args"])},
            )
            span.end(end_time=end * 1000)
            open_.append((end, span))

    def close(self) -> None:
        """Send what is left and stop the exporter's thread."""
        self.provider.shutdown()


def _attributes(args: dict[str, Any]) -> dict[str, Any]:
    """Span args as OpenTelemetry attributes (scalars and lists of scalars)."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        if isinstance(value, bool | int | float | str):
            out[key] = value
        elif isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
            out[key] = list(value)
        else:
            out[key] = str(value)
    return out
