"""The version window's regenerate policy: stale rows lose what was generated from them.

A row older than a consumer's window keeps its prompt fields; its versioned fields (and
what was written after them) are cleared on their units, so their producer makes them
again, and every consumer that had consumed the old version waits for the new one.
"""

from __future__ import annotations

from dataplane.memory.partition import Consumer, Partition, Row
from dataplane.memory.units import Units


async def regenerate(part: Partition, c: Consumer, rows: list[Row], units: Units) -> None:
    """Clear the versioned fields of stale rows so that their producer makes them again."""
    by_unit: dict[tuple[int, int], list[int]] = {}
    for row in rows:
        c.ready.pop(row.row, None)
        by_unit.setdefault((row.unit, row.versioned), []).append(row.row)
        row.ready &= ~row.versioned
        row.version, row.versioned = -1, 0
        c.counts["regenerated"] += 1
    await units.delete_fields(part, by_unit)  # gone before anyone can write the fields again
    for row in rows:
        for other in part.consumers.values():
            if row.acked >> other.bit & 1:  # it already consumed the old version: it gets the new one
                row.acked &= ~(1 << other.bit)
                other.pending[row.row] = None
                if other.mask is not None and row.ready & other.mask == other.mask:
                    other.ready[row.row] = None
                other.signal.fire()
