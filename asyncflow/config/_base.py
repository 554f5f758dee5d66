"""The base of every config section: strict, frozen, documented.

Knows nothing about what a section configures; it only fixes the rules every section
follows (unknown keys are errors, values are immutable once loaded). It is defined beside
the data store's own section (`dataplane.config`, which imports nothing from `asyncflow`).
"""

from __future__ import annotations

from dataplane.config import Section

__all__ = ["Section"]
