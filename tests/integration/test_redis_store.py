"""The Redis backend beyond the contract suite: durability across a server restart, lost
connections, credentials, dead clients' leases, retention, and access without Ray.

The session's private server (`redis_url`, tests/conftest.py) serves most tests; tests that
stop a server, or need AOF or an ACL user, start one of their own on a free port in a temp dir.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, start_redis  # pytest puts tests/ on sys.path

from asyncflow.config import DataPlaneConfig, parse_config
from asyncflow.errors import ConfigError, DataPlaneError, LeaseError, StorageUnavailable
from dataplane import StoreClient, start_store
from dataplane.redis import snapshot as snapshots
from dataplane.redis.client import RedisStoreClient
from dataplane.redis.snapshot import purge

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


class PrivateRedis:
    """A redis-server of this test's own (AOF with fsync on every write), stopped and started at will."""

    def __init__(self, directory: Path, *extra: str):
        self.port, self.dir, self.extra = free_port(), directory, extra
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = start_redis(
            str(self.dir), self.port, "--appendonly", "yes", "--appendfsync", "always", *self.extra
        )

    def kill(self) -> None:
        """As if the machine lost power: no shutdown, no final save."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def redis_config(url: str, **redis) -> DataPlaneConfig:
    return DataPlaneConfig(backend="redis", name=f"t{uuid.uuid4().hex[:8]}", redis={"url": url, **redis})


async def test_a_server_restart_loses_no_put_row_and_returns_no_acked_row(private_redis):
    handle = start_store(redis_config(private_redis.url, retry_deadline_s=30))
    client = await StoreClient.connect(handle.address)
    try:
        await client.create_partition("p", {"x": "int64"}, consumers=["c"])
        for i in range(10):
            await client.put("p", {"x": np.arange(10 * i, 10 * i + 10)})
        done = await client.get("p", ["x"], batch_size=30, consumer="c")
        await client.ack(done)
        private_redis.kill()
        put = asyncio.ensure_future(client.put("p", {"x": np.arange(100, 110)}))  # retried until it is back
        await asyncio.sleep(0.5)
        assert not put.done()
        private_redis.start()
        await asyncio.wait_for(put, 20)
        rest = await client.get("p", ["x"], batch_size=80, consumer="c", timeout_s=5)
        assert sorted(rest["x"].tolist()) == list(range(30, 110))  # each put row once, no acked row
        await client.ack(rest)
        stats = (await client.store_stats())["partitions"]["p"]
        assert stats["rows"] == 0 and stats["consumers"]["c"]["acked"] == 110
    finally:
        await client.close()


async def test_an_unreachable_server_gives_a_clear_error_without_the_password():
    port = free_port()  # nothing listens there
    url = f"redis://trainer:hunter2@127.0.0.1:{port}/0"
    with pytest.raises(StorageUnavailable, match="is the server running") as e:
        start_store(redis_config(url))
    assert "hunter2" not in str(e.value) and f"trainer:***@127.0.0.1:{port}" in str(e.value)
    start = time.monotonic()
    with pytest.raises(StorageUnavailable, match="is redis-server running") as e:
        await RedisStoreClient.connect(f"{url}#asyncflow:x", DataPlaneConfig().redis.model_copy(
            update={"retry_deadline_s": 0.5}))  # fmt: skip
    assert 0.4 < time.monotonic() - start < 5  # retried with backoff until the deadline, then gave up
    assert "hunter2" not in str(e.value) and "retry_deadline_s" in str(e.value)


async def test_a_server_that_stops_answering_is_retried_then_named(private_redis):
    """A hung server (the process stopped, its socket open) costs a command socket_timeout_s, is
    retried until retry_deadline_s, and past it gives StorageUnavailable; one that answers again
    in time completes the put once."""
    config = redis_config(private_redis.url, socket_timeout_s=0.3, retry_deadline_s=3)
    client = await StoreClient.connect(start_store(config).address)
    try:
        await client.create_partition("p", {"x": "int64"}, consumers=["c"])
        private_redis.proc.send_signal(signal.SIGSTOP)
        put = asyncio.ensure_future(client.put("p", {"x": np.arange(5)}))
        await asyncio.sleep(1.0)  # several timed-out attempts
        assert not put.done()
        private_redis.proc.send_signal(signal.SIGCONT)
        assert await asyncio.wait_for(put, 10) == list(range(5))
        got = await client.get("p", ["x"], batch_size=5, consumer="c", allow_partial=True, timeout_s=1)
        assert got["x"].tolist() == list(range(5))  # stored once, though it was sent several times

        private_redis.proc.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(StorageUnavailable, match="retry_deadline_s") as e:
            await client.ack(got)
        assert 2.5 < time.monotonic() - start < 8 and "TimeoutError" in str(e.value)
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
        await client.close()


async def test_acl_user_and_password_in_the_url(tmp_path):
    server = PrivateRedis(
        tmp_path, "--user", "default", "off", "--user", "trainer", "on", ">s3cret", "~*", "&*", "+@all"
    )
    server.start()
    try:
        config = redis_config(f"redis://trainer:s3cret@127.0.0.1:{server.port}/0")
        handle = start_store(config)
        for shown in (repr(config), repr(handle), repr(await StoreClient.connect(handle.address))):
            assert "s3cret" not in shown and "trainer:***@" in shown
        client = await StoreClient.connect(handle.address)
        await client.create_partition("p", {"x": "int64"}, consumers=["c"])
        await client.put("p", {"x": np.arange(3)})
        assert (await client.get("p", ["x"], 3, "c"))["x"].tolist() == [0, 1, 2]
        await client.close()
        with pytest.raises(StorageUnavailable, match="refused the credentials") as e:
            start_store(redis_config(f"redis://trainer:wrong-pass@127.0.0.1:{server.port}/0"))
        assert "wrong-pass" not in str(e.value)
    finally:
        server.kill()


def make_certs(directory: Path) -> None:
    """A CA and a server certificate for 127.0.0.1, made with the openssl command line."""
    for command in (
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 -subj /CN=asyncflow-test-ca",
        "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1",
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -extfile ext",
    ):
        (directory / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
        subprocess.run(["openssl", *command.split()], cwd=directory, check=True, capture_output=True)


async def test_tls_with_a_ca_bundle(tmp_path):
    make_certs(tmp_path)
    server = PrivateRedis(tmp_path)
    server.extra = (
        "--port",
        "0",
        "--tls-port",
        str(server.port),
        "--tls-cert-file",
        "server.crt",
        "--tls-key-file",
        "server.key",
        "--tls-ca-cert-file",
        "ca.crt",
        "--tls-auth-clients",
        "no",
    )
    server.start()
    url = f"rediss://127.0.0.1:{server.port}/0"
    try:
        handle = start_store(redis_config(url, ssl_ca_certs=str(tmp_path / "ca.crt")))
        client = await StoreClient.connect(handle.address)  # the address carries the CA bundle
        await client.create_partition("p", {"x": "float32[2]", "big": "uint8[300000]"}, consumers=["c"])
        big = np.random.default_rng(0).integers(0, 256, (2, 300_000), np.uint8)  # replies of many TLS records
        await client.put("p", {"x": np.ones((2, 2), np.float32), "big": big})
        got = await client.get("p", ["x", "big"], 2, "c")
        assert got["x"].sum() == 4 and np.array_equal(got["big"], big)
        await client.close()
        with pytest.raises(StorageUnavailable, match="rediss://127.0.0.1"):  # the server's CA is not trusted
            start_store(redis_config(url))
    finally:
        server.kill()


def test_config_errors_never_show_the_password():
    with pytest.raises(ConfigError, match="expected redis://host:port/db") as e:
        parse_config({"dataplane": {"backend": "redis", "redis": {"url": "http://u:hunter2@h:1/0"}}})
    assert "hunter2" not in str(e.value) and "u:***@h" in str(e.value)
    with pytest.raises(ConfigError, match="dataplane.redis.max_connections"):
        parse_config({"dataplane": {"redis": {"max_connections": 0}}})
    with pytest.raises(ConfigError, match="dataplane.backend"):
        parse_config({"dataplane": {"backend": "postgres"}})


async def test_leases_of_a_killed_client_come_back_within_heartbeats(pname, redis_url):
    handle = start_store(redis_config(redis_url, heartbeat_s=0.2))
    client = await StoreClient.connect(handle.address)
    await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
    await client.put(pname, {"x": np.arange(4)})
    holder = textwrap.dedent(f"""
        import asyncio, time
        from dataplane.config import RedisConfig
        from dataplane.redis.client import RedisStoreClient
        async def main():
            c = await RedisStoreClient.connect({handle.address!r}, RedisConfig(heartbeat_s=0.2))
            await c.get({pname!r}, ["x"], 4, "c", lease_s=600)
            print("held", flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
        os.kill(proc.pid, signal.SIGKILL)
        start = time.monotonic()
        batch = await client.get(pname, ["x"], batch_size=4, consumer="c", timeout_s=10)
        assert sorted(batch["x"].tolist()) == [0, 1, 2, 3]
        assert time.monotonic() - start < 3  # three heartbeats (0.6 s) and some slack, not lease_s (600 s)
        await client.ack(batch)
    finally:
        proc.kill()
        proc.wait()
        await purge(client)
        await client.close()


async def test_a_long_stream_leaves_nothing_behind(redis_url):
    """Acked rows are deleted as they go: Redis holds at most `capacity` rows however long the run."""
    handle = start_store(redis_config(redis_url))
    client = await StoreClient.connect(handle.address)
    raw = client._r  # type: ignore[attr-defined]
    ns = handle.address.split("#")[1]
    schema = {"ids": "int64[*]", "reward": "float32"}
    await client.create_partition("long", schema, capacity=256, consumers=["trainer", "logger"])

    async def produce():
        rng = np.random.default_rng(0)
        for _ in range(300):
            ids = [rng.integers(0, 9, size=int(n)) for n in rng.integers(1, 64, size=64)]
            await client.put("long", {"ids": ids, "reward": np.ones(64, np.float32)}, group_size=8)
        await client.seal("long")

    async def consume(name: str) -> int:
        seen = 0
        async for batch in client.stream("long", list(schema), 32, name, timeout_s=10):
            seen += len(batch)
        return seen

    sizes = []

    async def watch():
        while True:
            sizes.append(sum([await raw.memory_usage(k) or 0 async for k in raw.scan_iter(f"{ns}:*")]))
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch())
    _, seen_t, seen_l = await asyncio.gather(produce(), consume("trainer"), consume("logger"))
    watcher.cancel()
    assert seen_t == seen_l == 19200
    stats = (await client.store_stats())["partitions"]["long"]
    assert stats["rows"] == 0 and stats["freed"] == 19200
    for kind in ("rows", "refs", "xc", "acked"):
        assert await raw.hlen(f"{ns}:{{long}}:{kind}") == 0, kind
    assert [k async for k in raw.scan_iter(f"{ns}:{{long}}:x:*")] == []  # every chunk of cells is gone
    assert max(sizes) < 2_000_000  # 256 rows of < 600 bytes, plus bookkeeping: never the 19200 rows put
    await client.drop_partition("long")
    await purge(client)
    left = [k async for k in raw.scan_iter(f"{ns}:*")]
    assert all([0 < await raw.pttl(k) <= 60_000 for k in left])  # only wake-up streams, about to expire
    await client.close()


async def test_leaving_a_stream_early_cancels_its_read_ahead_at_once(pname, redis_url):
    """A cancelled get must stop: redis-py may swallow the cancellation of a blocking read."""
    handle = start_store(redis_config(redis_url))
    client = await StoreClient.connect(handle.address)
    try:
        await client.create_partition(pname, {"x": "int64[64]"}, consumers=["c"])
        for i in range(16):
            await client.put(pname, {"x": np.full((64, 64), i)})
        stream = client.stream(pname, ["x"], 64, "c", timeout_s=30, prefetch=4)
        seen = [batch async for batch in _take(stream, 16)]
        start = time.monotonic()
        await stream.aclose()  # cancels four read-ahead gets that wait for rows that never come
        await client.ack(seen[-1])
        assert time.monotonic() - start < 2
        stats = (await client.store_stats())["partitions"][pname]["consumers"]["c"]
        assert stats["acked"] == 1024 and stats["leased"] == 0
    finally:
        await purge(client)
        await client.close()


async def _take(stream, n: int):
    async for batch in stream:
        yield batch
        n -= 1
        if n == 0:
            return


@pytest.mark.parametrize("restore_chunk", [1, 1024])  # a chunk per row, and one for all rows
async def test_checkpoint_restores_into_a_fresh_redis_store(
    tmp_path, pname, restore_chunk, monkeypatch, redis_url
):
    monkeypatch.setattr(snapshots, "RESTORE_CHUNK", restore_chunk)
    source = await StoreClient.connect(start_store(redis_config(redis_url)).address)
    target = await StoreClient.connect(start_store(redis_config(redis_url)).address)
    try:
        schema = {"ids": "int64[*]", "meta": "any", "score": "float32"}
        await source.create_partition(pname, schema, consumers=["a", "b"])
        rows = await source.put(pname, {"ids": [np.arange(3), np.arange(1)], "meta": [{"k": 1}, None]})
        await source.put(pname, {"score": np.array([0.5], np.float32)}, rows=rows[:1])
        done = await source.get(pname, ["ids"], batch_size=1, consumer="a")
        await source.ack(done)
        await source.checkpoint(str(tmp_path))
        assert (await target.restore(str(tmp_path)))["rows"] == 2
        a = await target.get(pname, ["ids", "meta"], batch_size=1, consumer="a", timeout_s=2)
        assert a.rows == [rows[1]] and a["meta"] == [None]  # the acked row did not come back
        b = await target.get(pname, list(schema), batch_size=1, consumer="b", timeout_s=2)
        assert b["ids"][0].tolist() == [0, 1, 2] and b["score"].tolist() == [0.5]
        await target.put(
            pname, {"score": np.array([1.5], np.float32)}, rows=rows[1:]
        )  # unfinished fields go on
        await target.ack(a)
        await target.ack(b)
        last = await target.get(pname, list(schema), batch_size=1, consumer="b", timeout_s=2)
        assert last["score"].tolist() == [1.5]
        await target.ack(last)
        assert (await target.store_stats())["partitions"][pname]["rows"] == 0
    finally:
        for client in (source, target):
            await purge(client)
            await client.close()


async def test_a_consumer_first_asking_for_a_field_some_rows_lack_gets_only_complete_rows(pname, redis_url):
    """The ready set of a consumer's first get is a copy of its pending set only while no row lacks a
    field it asks for; the per-field counts behind that stay right through fills, stale rows and frees."""
    handle = start_store(redis_config(redis_url))
    client = await StoreClient.connect(handle.address)
    raw = client._r  # type: ignore[attr-defined]
    missing = f"{handle.address.split('#')[1]}:{{{pname}}}:missing"
    try:
        await client.create_partition(
            pname, {"x": "int64", "y": "int64"}, consumers=["c"], stale_policy="drop"
        )
        rows = await client.put(pname, {"x": np.arange(6)})
        await client.put(pname, {"y": np.arange(3) * 10}, rows=rows[:3], version=0)
        assert {int(v) for v in (await raw.hgetall(missing)).values()} <= {0, 3}
        batch = await client.get(pname, ["x", "y"], 6, "c", timeout_s=0.3, allow_partial=True)
        assert batch.rows == rows[:3] and batch["y"].tolist() == [0, 10, 20]
        await client.ack(batch)
        await client.put(pname, {"y": np.arange(3)}, rows=rows[3:], version=0)
        await client.put(pname, {"x": np.arange(2), "y": np.arange(2)}, version=5)
        batch = await client.get(pname, ["x", "y"], 2, "c", v_min=5)  # the version-0 rows are dropped
        assert batch["y"].tolist() == [0, 1]
        await client.ack(batch)
        assert all(int(v) == 0 for v in (await raw.hgetall(missing)).values())
        assert (await client.store_stats())["partitions"][pname]["rows"] == 0
    finally:
        await purge(client)
        await client.close()


async def test_a_get_reads_the_cells_of_rows_apart_in_one_chunk(pname, redis_url):
    """A put's cells of a field are one value and a get reads runs of adjacent cells; rows that
    are not adjacent (others were taken meanwhile) come back right, ragged and dense alike."""
    handle = start_store(redis_config(redis_url))
    one, two = [await StoreClient.connect(handle.address) for _ in range(2)]
    try:
        schema = {"ids": "int64[*]", "x": "float32[2]", "text": "str"}
        await one.create_partition(pname, schema, consumers=["c"])
        ids = [np.arange(i % 4) for i in range(8)]  # lengths 0..3: empty cells too
        x = np.arange(16, dtype=np.float32).reshape(8, 2)
        rows = await one.put(pname, {"ids": ids, "x": x, "text": [f"row {i}" for i in range(8)]})
        first = await one.get(pname, list(schema), 2, "c")  # rows 0, 1
        taken = await two.get(pname, list(schema), 3, "c")  # rows 2, 3, 4
        await one.release(first)
        batch = await one.get(pname, list(schema), 5, "c")  # rows 0, 1, 5, 6, 7: two runs
        assert batch.rows == [rows[i] for i in (0, 1, 5, 6, 7)]
        for got, i in zip(batch["ids"], (0, 1, 5, 6, 7)):
            assert got.tolist() == ids[i].tolist()
        assert batch["x"].tolist() == x[[0, 1, 5, 6, 7]].tolist()
        assert batch["text"] == ["row 0", "row 1", "row 5", "row 6", "row 7"]
        assert [t.tolist() for t in taken["ids"]] == [ids[i].tolist() for i in (2, 3, 4)]
        await one.ack(batch)
        await two.ack(taken)
        assert (await one.store_stats())["partitions"][pname]["rows"] == 0
    finally:
        await purge(one)
        for client in (one, two):
            await client.close()


async def test_a_put_over_the_redis_value_limit_is_refused_before_anything_is_stored(
    pname, monkeypatch, redis_url
):
    """A put's cells of one field are one Redis value; one over Redis' limit (lowered here to
    1 KiB) is refused with the field and the fix named, and the partition keeps what it had."""
    import dataplane.redis.puts as puts

    monkeypatch.setattr(puts, "MAX_VALUE_BYTES", 1024)
    client = await StoreClient.connect(start_store(redis_config(redis_url)).address)
    try:
        await client.create_partition(pname, {"x": "int64[*]"}, consumers=["c"])
        await client.put(pname, {"x": [np.arange(4)]})
        with pytest.raises(DataPlaneError, match="field 'x' holds .* put fewer rows at a time"):
            await client.put(pname, {"x": [np.arange(100), np.arange(100)]})
        batch = await client.get(pname, ["x"], 8, "c", timeout_s=0.3, allow_partial=True)
        assert [a.tolist() for a in batch["x"]] == [[0, 1, 2, 3]]
    finally:
        await purge(client)
        await client.close()


async def test_a_put_to_a_server_without_the_scripts_leaves_no_stray_cells(pname, redis_url):
    """A server that does not know the put script yet (new, restarted, flushed) refuses it inside
    the put's transaction after the cells were written: those cells are deleted, the put is
    retried, and only the chunk it stored remains, kept. The get after it meets an unknown script
    too, on the client's own connections (`dataplane.redis.wire`): it is given the script and retried."""
    handle = start_store(redis_config(redis_url))
    client = await StoreClient.connect(handle.address)
    raw, key = client._r, client._key(pname)  # type: ignore[attr-defined]
    try:
        await client.create_partition(pname, {"x": "int64"}, consumers=["c"])
        await raw.script_flush()
        assert await client.put(pname, {"x": np.arange(4)}) == [0, 1, 2, 3]
        chunks = [k async for k in raw.scan_iter(f"{key}:x:*")]
        assert len(chunks) == 1 and await raw.pttl(chunks[0]) == -1
        got = await client.get(pname, ["x"], batch_size=4, consumer="c")
        assert got["x"].tolist() == [0, 1, 2, 3]
    finally:
        await client.drop_partition(pname)
        await client.close()


async def test_acked_bits_are_kept_only_for_rows_a_consumer_still_needs(pname, redis_url):
    """One consumer's ack frees the row, so :acked is never written. With two consumers, each keeps
    a bitmap per block of 64 rows, and a block counts its live rows: both go with the block's last
    live row."""
    handle = start_store(redis_config(redis_url))
    client = await StoreClient.connect(handle.address)
    raw, key = client._r, client._key(pname)  # type: ignore[attr-defined]
    try:
        await client.create_partition(pname, {"x": "int64"}, consumers=["a"])
        await client.put(pname, {"x": np.arange(4)})
        first = await client.get(pname, ["x"], batch_size=2, consumer="a")
        await client.ack(first)
        assert not await raw.exists(f"{key}:acked") and await raw.hlen(f"{key}:rows") == 2
        await client.register_consumer(pname, "b")  # rows 2, 3: pending for both
        got_b = await client.get(pname, ["x"], batch_size=2, consumer="b")
        await client.ack(got_b)
        # consumer b (1) is done with rows 2 and 3 of block 0; a's bitmap is not written yet
        assert await raw.hgetall(f"{key}:acked") == {b"1:0": bytes([0b1100]) + bytes(7)}
        assert await raw.hgetall(f"{key}:blive") == {b"0": b"2"}
        got_a = await client.get(pname, ["x"], batch_size=2, consumer="a")
        assert got_a["x"].tolist() == [2, 3]
        await client.ack(got_a)
        assert not await raw.exists(f"{key}:acked", f"{key}:blive") and await raw.hlen(f"{key}:rows") == 0
        stats = (await client.store_stats())["partitions"][pname]
        assert stats["consumers"]["a"]["acked"] == 4 and stats["consumers"]["b"]["acked"] == 2
    finally:
        await client.drop_partition(pname)
        await client.close()


async def _waiting(raw, key: str, j: int) -> tuple[set, set]:
    """Consumer j's ready and not-yet-ready rows as stored."""
    ready, pend = await raw.zrange(f"{key}:c{j}:ready", 0, -1), await raw.zrange(f"{key}:c{j}:pend", 0, -1)
    return {int(r) for r in ready}, {int(r) for r in pend}


async def test_a_row_waits_in_exactly_one_set_of_each_consumer(pname, redis_url):
    """Whole rows go straight to each consumer's ready set and nowhere else; a row whose fields are
    not all written waits in the pending set and moves when they are; a get takes rows off the
    ready set; rows given back go where their fields say."""
    handle = start_store(redis_config(redis_url))
    client = await StoreClient.connect(handle.address)
    raw, key = client._r, client._key(pname)  # type: ignore[attr-defined]
    try:
        await client.create_partition(pname, {"x": "int64", "y": "int64"}, consumers=["a", "b"])
        await client.put(pname, {"x": np.arange(2), "y": np.arange(2)})
        assert await _waiting(raw, key, 0) == (set(), {0, 1})  # no get yet: fields asked for unknown
        for consumer in ("a", "b"):  # each tells its fields, and its rows are sorted once
            await client.release(await client.get(pname, ["x", "y"], batch_size=1, consumer=consumer))
        await client.put(pname, {"x": np.arange(2, 4), "y": np.arange(2, 4)})
        await client.put(pname, {"x": np.arange(4, 6)})  # rows 4, 5 lack y
        for j in (0, 1):
            assert await _waiting(raw, key, j) == ({0, 1, 2, 3}, {4, 5})
        await client.put(pname, {"y": np.array([40])}, rows=[4])
        assert await _waiting(raw, key, 0) == ({0, 1, 2, 3, 4}, {5})
        got = await client.get(pname, ["x", "y"], batch_size=3, consumer="a")
        assert got.rows == [0, 1, 2] and await _waiting(raw, key, 0) == ({3, 4}, {5})
        await client.release(got)
        assert await _waiting(raw, key, 0) == ({0, 1, 2, 3, 4}, {5})
        assert await _waiting(raw, key, 1) == ({0, 1, 2, 3, 4}, {5})
        stats = (await client.store_stats())["partitions"][pname]["consumers"]["a"]
        assert stats["pending"] == 6 and stats["ready"] == 5
    finally:
        await client.drop_partition(pname)
        await client.close()


async def test_an_ack_takes_whole_or_part_leases_and_a_retried_ack_changes_nothing(pname, redis_url):
    """An ack of a whole lease, of part of one, and of rows from two; the same ack sent again (its
    first reply lost) is a no-op; acking a row the client does not hold is refused and changes
    nothing, even beside rows it does hold."""
    handle = start_store(redis_config(redis_url))
    client = await StoreClient.connect(handle.address)
    raw, key = client._r, client._key(pname)  # type: ignore[attr-defined]

    async def ack_as_sent(held: bytes) -> None:  # the script call itself, as a retry would repeat it
        await client._run("ACK", pname, "a", client._peer, held)  # type: ignore[attr-defined]

    try:
        await client.create_partition(pname, {"x": "int64"}, consumers=["a", "b"])
        await client.put(pname, {"x": np.arange(16)})
        first = await client.get(pname, ["x"], batch_size=4, consumer="a")
        second = await client.get(pname, ["x"], batch_size=4, consumer="a")
        whole = client._held_rows(pname, "a", first.rows)  # type: ignore[attr-defined]
        await ack_as_sent(whole)
        await ack_as_sent(whole)
        assert len(await raw.hkeys(f"{key}:c0:lrows")) == 1  # second's
        part = client._held_rows(pname, "a", second.rows[:2])  # type: ignore[attr-defined]
        await ack_as_sent(part)
        await ack_as_sent(part)
        stats = (await client.store_stats())["partitions"][pname]["consumers"]["a"]
        assert stats["acked"] == 6 and stats["leased"] == 2
        third = await client.get(pname, ["x"], batch_size=4, consumer="a")
        stranger = client._held_rows(pname, "a", [*second.rows[2:], 15])  # type: ignore[attr-defined]
        with pytest.raises(LeaseError, match="15"):
            await ack_as_sent(stranger)  # row 15: waiting, not held
        stats = (await client.store_stats())["partitions"][pname]["consumers"]["a"]
        assert stats["acked"] == 6 and stats["leased"] == 6  # nothing changed
        both = client._held_rows(pname, "a", [*second.rows[2:], *third.rows])  # type: ignore[attr-defined]
        await ack_as_sent(both)
        stats = (await client.store_stats())["partitions"][pname]
        assert stats["consumers"]["a"]["acked"] == 12 and stats["consumers"]["a"]["leased"] == 0
        assert stats["rows"] == 16  # b still needs them: a's bitmap says a is done with rows 0-11
        assert await raw.hgetall(f"{key}:acked") == {b"0:0": b"\xff\x0f" + bytes(6)}
    finally:
        await client.drop_partition(pname)
        await client.close()


async def test_waiters_are_woken_at_once_and_no_one_else_is_told(pname, redis_url):
    """A get waiting for rows wakes when they are put, a put waiting for space when an ack frees
    it, each well before its blocking read would time out (15 s); while no client waits, puts and
    acks append nothing to the event streams."""
    handle = start_store(redis_config(redis_url))
    client = await StoreClient.connect(handle.address)
    raw, key = client._r, client._key(pname)  # type: ignore[attr-defined]

    async def entries() -> tuple[bytes, bytes]:
        ids = [await raw.xrevrange(f"{key}:{s}", count=1) for s in ("ev", "space")]
        return tuple(e[0][0] if e else b"" for e in ids)  # type: ignore[return-value]

    try:
        await client.create_partition(pname, {"x": "int64"}, capacity=4, consumers=["c"])
        waiting = asyncio.ensure_future(client.get(pname, ["x"], batch_size=2, consumer="c", timeout_s=30))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await client.put(pname, {"x": np.arange(2)})
        first = await waiting
        assert first.rows == [0, 1] and time.monotonic() - started < 3
        await client.ack(first)
        before = await entries()
        for _ in range(2):  # no one waits: nothing is appended
            batch_rows = await client.put(pname, {"x": np.arange(2)})
            got = await client.get(pname, ["x"], batch_size=2, consumer="c")
            assert got.rows == batch_rows
            await client.ack(got)
        assert await entries() == before
        await client.put(pname, {"x": np.arange(4)})  # full
        blocked = asyncio.ensure_future(client.put(pname, {"x": np.arange(2)}, timeout_s=30))
        await asyncio.sleep(0.3)
        assert not blocked.done()
        started = time.monotonic()
        await client.ack(await client.get(pname, ["x"], batch_size=2, consumer="c"))
        await blocked
        assert time.monotonic() - started < 3
    finally:
        await client.drop_partition(pname)
        await client.close()
