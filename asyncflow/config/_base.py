"""The base of every config section: strict, frozen, documented.

Knows nothing about what a section configures; it only fixes the rules every section
follows (unknown keys are errors, values are immutable once loaded).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section. Every field declares bounds and a description."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
