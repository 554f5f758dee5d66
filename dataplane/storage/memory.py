"""A storage unit that holds rows in memory: the bytes half of the in-memory store.

Clients write and read cells (one field of one row) here directly; the controller never
sees them. Array cells are kept as views into the message buffer they arrived in, so
nothing is decoded into Python objects or copied on the way in, and on the way out they
go to the socket straight from that memory. (A received message's buffer lives until
the last row written with it is freed.)

A write is all-or-nothing: if any cell already exists ("field written twice") nothing
of the request is stored. This class knows nothing about readiness, consumers or Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from asyncflow.errors import DataPlaneError, SchemaError
from dataplane.codec import pack, unpack


def _nbytes(value: Any) -> int:
    return int(getattr(value, "nbytes", None) or (len(value) if isinstance(value, str | bytes) else 0))


class MemoryStorage:
    RPC_METHODS = ("write", "read", "delete", "drop_partition", "dump", "load", "stats")

    def __init__(self, unit: int = 0):
        self.unit = unit
        self._cells: dict[tuple[str, int], dict[str, Any]] = {}
        self._bytes = 0
        self._writes = 0
        self._reads = 0

    async def write(self, partition: str, rows: list[int], columns: dict[str, list[Any]]) -> int:
        """Store `columns[field][i]` as field of `rows[i]`; refuse the whole write if any cell exists."""
        for field, values in columns.items():
            if len(values) != len(rows):
                raise SchemaError(f"field {field!r}: {len(values)} values for {len(rows)} rows")
            for row in rows:
                cell = self._cells.get((partition, row))
                if cell is not None and field in cell:
                    raise SchemaError(
                        f"partition {partition!r}, row {row}: field {field!r} is already written; "
                        "a field is written once per row. Nothing of this put was stored."
                    )
        added = 0
        for i, row in enumerate(rows):
            cell = self._cells.setdefault((partition, row), {})
            for field, values in columns.items():
                cell[field] = values[i]
                added += _nbytes(values[i])
        self._bytes += added
        self._writes += 1
        return added

    async def read(self, partition: str, rows: list[int], fields: list[str]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {f: [] for f in fields}
        for row in rows:
            cell = self._cells.get((partition, row))
            if cell is None:
                raise DataPlaneError(
                    f"storage unit {self.unit}: partition {partition!r} row {row} is not here"
                )
            for field in fields:
                try:
                    out[field].append(cell[field])
                except KeyError:
                    raise DataPlaneError(
                        f"storage unit {self.unit}: row {row} of {partition!r} has no field {field!r}"
                    ) from None
        self._reads += 1
        return out

    async def delete(self, partition: str, rows: list[int], fields: list[str] | None = None) -> int:
        freed = 0
        for row in rows:
            if fields is None:
                cell = self._cells.pop((partition, row), None) or {}
                freed += sum(_nbytes(v) for v in cell.values())
                continue
            cell = self._cells.get((partition, row))
            for field in fields:
                if cell is not None and field in cell:
                    freed += _nbytes(cell.pop(field))
        self._bytes -= freed
        return freed

    async def drop_partition(self, partition: str) -> int:
        rows = [row for (p, row) in self._cells if p == partition]
        return await self.delete(partition, rows)

    async def dump(self, path: str) -> int:
        """Write every cell to `path` as length-prefixed codec blobs; return the row count."""
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            for (partition, row), cell in self._cells.items():
                blob = pack([partition, row, cell])
                f.write(len(blob).to_bytes(8, "little"))
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return len(self._cells)

    async def load(self, path: str, keep: dict[str, dict[int, list[str]]]) -> int:
        """Load cells from a dump, keeping only `keep[partition][row]` fields (what the controller knows)."""
        data = memoryview(Path(path).read_bytes())
        offset, loaded = 0, 0
        while offset < len(data):
            size = int.from_bytes(data[offset : offset + 8], "little")
            partition, row, cell = unpack(data[offset + 8 : offset + 8 + size])
            offset += 8 + size
            wanted = keep.get(partition, {}).get(row)
            if not wanted:
                continue
            kept = {f: v for f, v in cell.items() if f in wanted}
            self._cells[(partition, row)] = kept
            self._bytes += sum(_nbytes(v) for v in kept.values())
            loaded += 1
        return loaded

    async def stats(self) -> dict[str, int]:
        return {"unit": self.unit, "rows": len(self._cells), "bytes": self._bytes, "writes": self._writes,
                "reads": self._reads}  # fmt: skip
