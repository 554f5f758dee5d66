"""Config of the streaming data store (`dataplane:` in a run config).

Only numbers and names: nothing here imports the store itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncflow.config._base import Section


class DataPlaneConfig(Section):
    """Where samples live between producers and consumers, and how long anyone waits."""

    backend: Literal["memory"] = Field(
        "memory",
        description="Storage backend. `memory`: storage-unit Ray actors hold the bytes "
        "(default; needs nothing but Ray).",
    )
    name: str = Field(
        "asyncflow",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Store name: the controller and storage units are named Ray actors under it, "
        "so other processes attach with only this name.",
    )
    num_storage_units: int = Field(
        2, ge=1, le=256, description="Storage-unit actors holding encoded rows; more spreads memory and I/O."
    )
    capacity_rows: int = Field(
        4096,
        ge=1,
        le=10_000_000,
        description="Default rows a partition holds before `put` waits (back-pressure). A row is freed "
        "when every registered consumer has acked it.",
    )
    lease_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="How long a consumer holds rows it got before they are redelivered to another "
        "instance of that consumer (a dead consumer loses nothing).",
    )
    put_timeout_s: float = Field(
        300.0, gt=0, le=86_400, description="Longest a `put` waits for free capacity before StoreTimeout."
    )
    get_timeout_s: float = Field(
        300.0, gt=0, le=86_400, description="Longest a `get` waits for enough ready rows before StoreTimeout."
    )
    stale_policy: Literal["drop", "regenerate"] = Field(
        "drop",
        description="What happens to a row that falls out of a consumer's version window: `drop` it "
        "(counted), or `regenerate` it (its generated fields are cleared so the producer makes it again).",
    )
    controller_num_cpus: float = Field(
        0.1, ge=0, le=64, description="Logical CPUs Ray reserves for the controller actor (it is I/O bound)."
    )
    storage_num_cpus: float = Field(
        0.1, ge=0, le=64, description="Logical CPUs Ray reserves for each storage-unit actor."
    )
