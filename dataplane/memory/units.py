"""The storage units as the controller sees them: where new rows go, how full each is, and the
deletes it sends them. Knows nothing about readiness, consumers or leases."""

from __future__ import annotations

import asyncio
from typing import Any

from dataplane.memory.partition import Partition, Row


class Units:
    def __init__(self, stubs: list[Any], addresses: list[str]):
        """`stubs`: objects with the storage-unit methods (wire connections or local instances)."""
        self.stubs, self.addresses = stubs, addresses
        self.bytes = [0] * len(stubs)  # committed bytes of live rows
        self.rows = [0] * len(stubs)  # live rows, committed or only reserved
        self._deletes: dict[tuple[str, int], list[int]] = {}

    def __len__(self) -> int:
        return len(self.stubs)

    def place(self, n: int) -> list[int]:
        """Contiguous runs of up to 64 rows, each to the least-loaded unit.

        Load is bytes held plus reserved rows at the average row size, so a burst of
        reservations spreads out before their commits report real sizes.
        """
        units: list[int] = []
        avg = sum(self.bytes) / max(sum(self.rows), 1)
        for start in range(0, n, 64):
            run = min(64, n - start)
            unit = min(range(len(self.stubs)), key=lambda u: self.bytes[u] + self.rows[u] * avg)
            self.rows[unit] += run
            units += [unit] * run
        return units

    def add(self, row: Row) -> None:
        """A restored row lives on its unit again."""
        self.bytes[row.unit] += row.nbytes
        self.rows[row.unit] += 1

    def free(self, partition: str, row: Row) -> None:
        """Forget a row; its cells are deleted with the other rows freed in this loop iteration
        (one delete request per unit)."""
        self.bytes[row.unit] -= row.nbytes
        self.rows[row.unit] -= 1
        first = not self._deletes
        self._deletes.setdefault((partition, row.unit), []).append(row.row)
        if first:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))

    async def _flush(self) -> None:
        batch, self._deletes = self._deletes, {}
        await asyncio.gather(
            *(self.stubs[u].delete(partition=p, rows=rows) for (p, u), rows in batch.items())
        )

    async def delete_fields(self, part: Partition, cells: dict[tuple[int, int], list[int]]) -> None:
        """Delete cells now: `cells` maps (unit, field mask) to the rows whose fields go."""
        await asyncio.gather(
            *(
                self.stubs[unit].delete(partition=part.name, rows=rows, fields=part.fields(mask))
                for (unit, mask), rows in cells.items()
            )
        )

    async def each(self, method: str, **kwargs: Any) -> list[Any]:
        """`method` on every unit, concurrently."""
        return list(await asyncio.gather(*(getattr(u, method)(**kwargs) for u in self.stubs)))
