"""Shared fixtures: one local Ray for the whole test session, and a store per backend.

Ray on a 2-core machine: the session starts one instance with more logical CPUs than
cores (the store's actors reserve fractions and mostly wait on I/O) and every test
reuses it; tests isolate themselves by partition name, not by restarting Ray.
"""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session", params=["memory", "redis"])
def store(request, ray_session):
    """A running store of each backend. The Redis one (127.0.0.1:6379, see .ci/run) gets a name of
    its own per test session and is emptied at the end, so runs never see each other's rows."""
    from asyncflow.config import DataPlaneConfig
    from dataplane import start_store

    name = f"test-{request.param}" + (f"-{uuid.uuid4().hex[:8]}" if request.param == "redis" else "")
    handle = start_store(DataPlaneConfig(name=name, backend=request.param, lease_s=30.0))
    yield handle
    handle.shutdown()
    if request.param == "redis":
        purge_redis_store(handle.address)


def purge_redis_store(address: str) -> None:
    import asyncio

    from dataplane.storage.redis import RedisStoreClient
    from dataplane.storage.redis_snapshot import purge

    async def run() -> None:
        client = await RedisStoreClient.connect(address)
        try:
            await purge(client)
        finally:
            await client.close()

    asyncio.run(run())


@pytest.fixture
async def client(store):
    from dataplane import StoreClient

    c = await StoreClient.connect(store.address)
    yield c
    await c.close()


@pytest.fixture
def client_sync(store):
    c = store.client()
    yield c
    c.close()


@pytest.fixture
def pname() -> str:
    """A partition name no other test uses."""
    return f"p{uuid.uuid4().hex[:10]}"
