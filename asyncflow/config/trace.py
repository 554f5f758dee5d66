"""Config of a run's trace: the spans every actor records (asyncflow.tracing), written to the
run directory's trace.json, and optionally exported over OpenTelemetry. Nothing here imports
opentelemetry."""

from __future__ import annotations

from pydantic import Field, field_validator

from asyncflow.config._base import Section


class TraceConfig(Section):
    """Spans of every actor (admit, generate, reward, store waits, train step, weight sync, ...)."""

    enabled: bool = Field(
        True,
        description="Record spans in every actor and append them to <run_dir>/trace.json "
        "(open it in https://ui.perfetto.dev or chrome://tracing; `asyncflow trace RUN_DIR "
        "--sample P:S` prints one sample's life). Off: no spans, and no time/... figures in metrics.",
    )
    max_events: int = Field(
        100_000,
        ge=100,
        le=10_000_000,
        description="Spans an actor keeps between two collections; more are dropped and "
        "counted in a trace.dropped event, so a stalled run cannot fill an actor's memory.",
    )
    collect_every_s: float = Field(
        1.0,
        ge=0,
        le=3600,
        description="How often the driver collects the actors' spans into trace.json, in the "
        "background (0: after every step). Each step's time/<role>/<span> figures are the seconds "
        "per step over the latest collection's steps.",
    )
    otlp_endpoint: str | None = Field(
        None,
        max_length=2048,
        description="Also send every span to this OpenTelemetry collector, as OTLP over HTTP "
        "(e.g. http://127.0.0.1:4318/v1/traces; needs the `otel` extra). Unset: trace.json only.",
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _http(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(
                f"otlp_endpoint {url!r} is not an http(s) URL; give the collector's OTLP/HTTP traces "
                "endpoint, e.g. http://127.0.0.1:4318/v1/traces"
            )
        return url
