"""A storage unit that holds rows in memory: the bytes half of the in-memory store.

Clients write and read cells (one field of one row) here directly; the controller never
sees them. A written column is kept as the buffer it arrived in and a cell is (chunk,
index), so nothing is decoded into Python objects or copied on the way in, and a read of
rows that were written together goes out as a slice of that same memory. (A received
buffer lives until the last row written with it is freed.)

A write is all-or-nothing: if any cell already exists ("field written twice") nothing
of the request is stored. No method takes a file path: a checkpoint's bytes travel to the
client that asked for it, which writes them where it chose. This class knows nothing about
readiness, consumers or Ray.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dataplane.codec import pack, unpack
from dataplane.columns import Chunk, read_column
from dataplane.errors import DataPlaneError, SchemaError


class MemoryStorage:
    RPC_METHODS = ("write", "read", "delete", "drop_partition", "dump", "load", "stats")

    def __init__(self, unit: int = 0):
        self.unit = unit
        # partition -> row -> segments; a segment is (the chunks of one write, the row's index in them).
        # A row filled by three producers has three segments: one small tuple per row and write.
        self._rows: dict[str, dict[int, list[tuple[dict[str, Chunk], int]]]] = {}
        self._bytes = 0
        self._writes = 0
        self._reads = 0

    async def write(self, partition: str, rows: list[int], columns: dict[str, list]) -> int:
        """Store row i of each column (see `dataplane.columns`) as that field of `rows[i]`.

        The whole write is refused if any of its cells already exists.
        """
        chunks = {field: Chunk(column) for field, column in columns.items()}
        for field, chunk in chunks.items():
            if len(chunk) != len(rows):
                raise SchemaError(f"field {field!r}: {len(chunk)} values for {len(rows)} rows")
        table = self._rows.setdefault(partition, {})
        for row in rows:  # check everything before changing anything
            for written, _ in table.get(row, ()):
                if not written.keys().isdisjoint(chunks):
                    field = sorted(written.keys() & chunks.keys())[0]
                    raise SchemaError(
                        f"partition {partition!r}, row {row}: field {field!r} is already written; "
                        "a field is written once per row. Nothing of this put was stored."
                    )
        for i, row in enumerate(rows):
            segments = table.get(row)
            if segments is None:
                table[row] = [(chunks, i)]
            else:
                segments.append((chunks, i))
        added = sum(chunk.total_nbytes() for chunk in chunks.values())
        self._bytes += added
        self._writes += 1
        return added

    def _cell(self, partition: str, row: int, field: str) -> tuple[Chunk, int]:
        segments = self._rows.get(partition, {}).get(row)
        if segments is None:
            raise DataPlaneError(f"storage unit {self.unit}: partition {partition!r} row {row} is not here")
        for chunks, i in segments:
            chunk = chunks.get(field)
            if chunk is not None:
                return chunk, i
        raise DataPlaneError(f"storage unit {self.unit}: row {row} of {partition!r} has no field {field!r}")

    async def read(self, partition: str, rows: list[int], fields: list[str]) -> dict[str, list]:
        """One column per field for `rows`, in that order."""
        self._reads += 1
        return {f: read_column([self._cell(partition, row, f) for row in rows]) for f in fields}

    async def delete(self, partition: str, rows: list[int], fields: list[str] | None = None) -> int:
        """Forget whole rows, or only some of their fields."""
        table = self._rows.get(partition, {})
        freed = 0
        for row in rows:
            segments = table.pop(row, None) if fields is None else table.get(row)
            if not segments:
                continue
            kept = []
            for chunks, i in segments:
                gone = chunks.keys() if fields is None else chunks.keys() & set(fields)
                freed += sum(chunks[f].nbytes(i) for f in gone)
                rest = {f: c for f, c in chunks.items() if f not in gone}
                if rest:
                    kept.append((rest, i))
            if fields is not None and kept:
                table[row] = kept
            elif fields is not None:
                del table[row]  # no cell left: the row is not here any more
        self._bytes -= freed
        return freed

    async def drop_partition(self, partition: str) -> int:
        return await self.delete(partition, list(self._rows.get(partition, {})))

    def _row_values(self, segments) -> dict[str, Any]:
        return {f: chunk.row(i) for chunks, i in segments for f, chunk in chunks.items()}

    async def dump(self) -> np.ndarray:
        """Every row as length-prefixed codec blobs, back to back (the checkpoint's unit file)."""
        records = []
        for partition, table in self._rows.items():
            for row, segments in table.items():
                blob = pack([partition, row, self._row_values(segments)])
                records += [len(blob).to_bytes(8, "little"), blob]
        return np.frombuffer(b"".join(records), np.uint8)

    async def load(self, data: Any, keep: dict[str, dict[int, list[str]]]) -> int:
        """Load rows from (part of) a dump, keeping only `keep[partition][row]` fields (what the
        controller knows); returns the rows loaded."""
        data = memoryview(data).cast("B")
        offset, loaded = 0, 0
        while offset < len(data):
            size = int.from_bytes(data[offset : offset + 8], "little")
            if offset + 8 + size > len(data):
                raise DataPlaneError(
                    f"storage unit {self.unit}: a checkpoint record is cut short at byte {offset}"
                )
            partition, row, values = unpack(data[offset + 8 : offset + 8 + size])
            offset += 8 + size
            wanted = keep.get(partition, {}).get(row)
            if not wanted:
                continue
            chunks = {f: Chunk.of(v) for f, v in values.items() if f in wanted}
            self._rows.setdefault(partition, {})[row] = [(chunks, 0)]
            self._bytes += sum(chunk.total_nbytes() for chunk in chunks.values())
            loaded += 1
        return loaded

    async def stats(self) -> dict[str, int]:
        rows = sum(len(table) for table in self._rows.values())
        return {
            "unit": self.unit,
            "rows": rows,
            "bytes": self._bytes,
            "writes": self._writes,
            "reads": self._reads,
        }
