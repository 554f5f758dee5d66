"""Whole-store views of a Redis store: stats, checkpoint, restore, purge.

A checkpoint is written in the memory backend's format (`controller.msgpack` plus a
`unit-0.bin` of codec blobs), so a checkpoint of either backend restores into the other.
Each partition is read by one script, so it is a consistent snapshot of that partition;
partitions are independent of each other. Knows the key layout of `dataplane.redis.scripts`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from dataplane.codec import pack, unpack
from dataplane.errors import DataPlaneError, UnknownPartition
from dataplane.redis.cells import decode_value, encode_value
from dataplane.schema import parse_schema

if TYPE_CHECKING:
    from dataplane.redis.client import RedisStoreClient

RESTORE_CHUNK = 1024  # rows whose cells a restore writes as one chunk (one value per field)
_COUNTS = ("delivered", "acked", "redelivered", "dropped_stale", "regenerated", "waits")


def _pairs(flat: list) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2]))


def _decode(reply: list) -> tuple[dict[str, str], list[str], dict[int, list], list, list]:
    meta = {k.decode(): v.decode() for k, v in _pairs(reply[0]).items()}
    cons = [c.decode() for c, _ in sorted(_pairs(reply[1]).items(), key=lambda kv: int(kv[1]))]
    rows = {int(r): msgpack.unpackb(m) for r, m in _pairs(reply[2]).items()}
    for r, bits in _pairs(reply[4]).items():  # acked bits live beside the metadata
        rows[int(r)][6] = int(bits)
    return meta, cons, dict(sorted(rows.items())), reply[3], reply[5:]


async def stats(client: RedisStoreClient) -> dict:
    partitions: dict[str, dict[str, Any]] = {}
    for name in await client.partitions():
        try:
            meta, cons, rows, counts, _ = _decode(await client._run("SNAPSHOT", name, "0"))
        except UnknownPartition:
            continue  # dropped meanwhile
        bits = {f: b for b, (f, _) in enumerate(json.loads(meta["schema"]))}
        consumers = {}
        for consumer, (pending, ready, leased, raw) in zip(cons, counts):
            n = {k.decode(): float(v) for k, v in _pairs(raw).items()}
            consumers[consumer] = {
                "pending": int(pending),
                "ready": int(ready),
                "leased": int(leased),
                "wait_s": round(n.get("wait_s", 0.0), 4),
                **{c: int(n.get(c, 0)) for c in _COUNTS},
            }
        partitions[name] = {
            "rows": int(meta["live"]),
            "reserved": 0,  # a put reserves and writes in one step: nothing is ever half-put
            "capacity": int(meta["capacity"]),
            "created": int(meta["created"]),
            "freed": int(meta["freed"]),
            "put_waits": int(meta["put_waits"]),
            "ready": {f: sum(1 for m in rows.values() if int(m[4]) >> b & 1) for f, b in bits.items()},
            "consumers": consumers,
        }
    memory = await client._call(client._r.info, "memory")
    unit = {
        "unit": 0,
        "backend": "redis",
        "rows": sum(p["rows"] for p in partitions.values()),
        "used_memory": int(memory.get("used_memory", 0)),
    }
    return {"partitions": partitions, "units": [unit]}


async def checkpoint(client: RedisStoreClient, path: str) -> dict:
    Path(path).mkdir(parents=True, exist_ok=True)
    saved, count = [], 0
    tmp = Path(path, "unit-0.bin.tmp")
    with open(tmp, "wb") as out:
        for name in await client.partitions():
            try:
                meta, cons, rows, _, cells = _decode(await client._run("SNAPSHOT", name, "1"))
            except UnknownPartition:
                continue
            specs = parse_schema(dict(json.loads(meta["schema"])))
            by_field = [_pairs(flat) for flat in cells]
            for r in rows:
                values = {
                    f: decode_value(spec, by_field[b][str(r).encode()])
                    for b, (f, spec) in enumerate(specs.items())
                    if str(r).encode() in by_field[b]
                }
                blob = pack([name, r, values])
                out.write(len(blob).to_bytes(8, "little"))
                out.write(blob)
                count += 1
            saved.append(
                {
                    "name": name,
                    "schema": {f: str(s) for f, s in specs.items()},
                    "capacity": int(meta["capacity"]),
                    "stale_policy": meta["stale"],
                    "next_row": int(meta["next_row"]),
                    "created": int(meta["created"]),
                    "next_group": int(meta["next_group"]),
                    "sealed": meta["sealed"] == "1",
                    "consumers": cons,
                    "rows": [[r, 0, *m[:8]] for r, m in rows.items()],
                }
            )
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, Path(path, "unit-0.bin"))
    Path(path, "controller.msgpack").write_bytes(pack({"version": 1, "partitions": saved}))
    return {"partitions": len(saved), "rows": count, "unit_rows": [count]}


def _load_cells(path: str) -> dict[tuple[str, int], dict[str, Any]]:
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for dump in sorted(Path(path).glob("unit-*.bin")):
        data = memoryview(dump.read_bytes())
        offset = 0
        while offset < len(data):
            size = int.from_bytes(data[offset : offset + 8], "little")
            partition, row, values = unpack(data[offset + 8 : offset + 8 + size])
            offset += 8 + size
            cells.setdefault((partition, row), {}).update(values)
    return cells


async def restore(client: RedisStoreClient, path: str) -> dict:
    existing = await client.partitions()
    if existing:
        raise DataPlaneError(
            f"restore into store {client.namespace!r} that already has partitions {existing}; restore into "
            "a fresh store (another dataplane.name), or drop those partitions first"
        )
    state = unpack(Path(path, "controller.msgpack").read_bytes())
    cells = _load_cells(path)
    total = 0
    for saved in state["partitions"]:
        name, specs = saved["name"], parse_schema(saved["schema"])
        key = client._key(name)
        refs: list[list] = [["", 0, 0] * len(specs) for _ in saved["rows"]]  # chunk, offset, length
        for first in range(0, len(saved["rows"]), RESTORE_CHUNK):  # chunks as a put writes them
            chunk = f"restore{first // RESTORE_CHUNK}"
            async with client._r.pipeline(transaction=False) as pipe:
                for b, (f, spec) in enumerate(specs.items()):
                    blob = bytearray()
                    for i, row in enumerate(saved["rows"][first : first + RESTORE_CHUNK], first):
                        values = cells.get((name, row[0]), {})
                        if row[6] >> b & 1 and f in values:
                            cell = encode_value(spec, values[f])
                            refs[i][3 * b : 3 * b + 3] = [chunk, len(blob), len(cell)]
                            blob += cell
                    if blob:
                        pipe.set(f"{key}:x:{chunk}:{b}", bytes(blob))
                await client._call(pipe.execute)
        rows = [
            x for row, ref in zip(saved["rows"], refs) for x in (row[0], msgpack.packb([*row[2:10], *ref]))
        ]
        await client._run(
            "RESTORE", name, f"{client.namespace}:partitions", name,
            json.dumps([[f, str(s)] for f, s in specs.items()]), saved["capacity"], saved["stale_policy"],
            saved["next_row"], saved["next_group"], saved["created"], int(saved["sealed"]),
            len(specs), *specs, len(saved["consumers"]), *saved["consumers"], *rows,
        )  # fmt: skip
        total += len(saved["rows"])
    return {"partitions": len(state["partitions"]), "rows": total}


async def purge(client: RedisStoreClient) -> int:
    """Drop every partition of the store and its saved settings; returns how many partitions."""
    names = await client.partitions()
    for name in names:
        await client.drop_partition(name)
    await client._call(client._r.delete, f"{client.namespace}:config", f"{client.namespace}:partitions")
    return len(names)
