"""The weight store's config section: how a published version is cut into buckets and streamed."""

from __future__ import annotations

from pydantic import Field

from asyncflow.config._base import Section


class WeightsConfig(Section):
    """The weight store: recent versions as equal-size byte buckets, each checked by its fingerprint
    when pulled, spread over `channels` transfer streams (workers.weights)."""

    keep_versions: int = Field(2, ge=1, le=1000, description="Versions kept; older ones are freed.")
    bucket_mb: float = Field(
        64.0,
        gt=0,
        le=65536,
        description="Size of one bucket: the weights' bytes are cut into buckets of exactly this size "
        "(the last one smaller; a tensor may span several).",
    )
    channels: int = Field(
        2,
        ge=1,
        le=64,
        description="Transfer streams per publisher and per puller; bucket b rides stream b % channels, so "
        "each carries the same bytes to within one bucket. On CPU a stream is a thread that puts (or maps "
        "and checks) its buckets through Ray's object store.",
    )
