"""The Redis password from an environment variable (how the Kubernetes manifests pass the Secret)."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid

import numpy as np
import pytest

from asyncflow.config import DataPlaneConfig
from asyncflow.errors import ConfigError, StorageUnavailable
from dataplane import StoreClient, start_store

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_with_password():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--requirepass", "s3cret-from-a-secret"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.kill()
    proc.wait()


async def test_the_store_reads_its_password_from_the_named_variable(redis_with_password, monkeypatch):
    var = "ASYNCFLOW_TEST_REDIS_PASSWORD"
    config = DataPlaneConfig(
        backend="redis",
        name=f"t{uuid.uuid4().hex[:8]}",
        redis={"url": redis_with_password, "password_env": var},
    )
    monkeypatch.delenv(var, raising=False)
    with pytest.raises(
        ConfigError, match=f"names '{var}', but this process has no such environment variable"
    ):
        start_store(config)
    monkeypatch.setenv(var, "wrong")
    with pytest.raises(StorageUnavailable, match="refused the credentials") as e:
        start_store(config)
    assert "wrong" not in str(e.value)
    monkeypatch.setenv(var, "s3cret-from-a-secret")
    handle = start_store(config)
    assert "s3cret" not in repr(handle)
    client = await StoreClient.connect(handle.address)  # other processes get the password in the address
    try:
        await client.create_partition("p", {"x": "int64"}, consumers=["c"])
        await client.put("p", {"x": np.arange(3)})
        assert (await client.get("p", ["x"], 3, "c"))["x"].tolist() == [0, 1, 2]
        await client.drop_partition("p")
    finally:
        await client.close()
