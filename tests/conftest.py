"""Shared fixtures: one local Ray and one private Redis for the whole test session, and a store
per backend.

Ray on a 2-core machine: the session starts one instance with more logical CPUs than
cores (the store's actors reserve fractions and mostly wait on I/O) and every test
reuses it; tests isolate themselves by partition name, not by restarting Ray. Redis: a
`redis-server` of the session's own, on a free port in a temp dir, so no test touches a
server the user runs; tests that stop a server or need AOF or an ACL start their own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(directory: str, port: int, *extra: str) -> subprocess.Popen:
    """A redis-server on 127.0.0.1:port, working in `directory`; returns once it answers."""
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
            "--save", "", "--appendonly", "no", *extra]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not start on port {port}; is redis-server installed?")


@pytest.fixture(scope="session")
def redis_url():
    """The URL of this session's private Redis (no persistence), stopped at the end."""
    directory = tempfile.mkdtemp(prefix="asyncflow-test-redis-")
    port = free_port()
    proc = start_redis(directory, port)
    yield f"redis://127.0.0.1:{port}/0"
    proc.kill()
    proc.wait()
    shutil.rmtree(directory, ignore_errors=True)


def start_session_ray():
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    _session_ray["up"] = True


_session_ray = {"up": False}


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if ray.is_initialized():  # a test started one of its own (see one_ray): not the session's
        ray.shutdown()
    start_session_ray()
    yield ray
    _session_ray["up"] = False
    ray.shutdown()


@pytest.fixture(autouse=True)
def one_ray():
    """Every test that uses Ray uses the session's: a test that starts Ray itself (a benchmark's
    main, a `train()` without `ray_session`) has its Ray shut down after it, so the fixture never
    reuses one with other resources; one that shut the session's Ray down has it started again."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and _session_ray["up"] and not ray.is_initialized():
        start_session_ray()
    was_up = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if ray is not None and not was_up and not _session_ray["up"] and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session", params=["memory", "redis"])
def store(request, ray_session):
    """A running store of each backend; the Redis one lives in the session's private server."""
    from asyncflow.config import DataPlaneConfig
    from dataplane import start_store

    name = f"test-{request.param}" + (f"-{uuid.uuid4().hex[:8]}" if request.param == "redis" else "")
    redis = {"url": request.getfixturevalue("redis_url")} if request.param == "redis" else {}
    handle = start_store(DataPlaneConfig(name=name, backend=request.param, lease_s=30.0, redis=redis))
    yield handle
    handle.shutdown()
    if request.param == "redis":
        purge_redis_store(handle.address)


def purge_redis_store(address: str) -> None:
    import asyncio

    from dataplane.redis.client import RedisStoreClient
    from dataplane.redis.snapshot import purge

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


ARITHMETIC = [
    f"What is {a} plus {b}? {a} + {b} = {a + b}. #### {a + b}" for a in range(40) for b in range(40)
]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny randomly initialised Llama, Qwen2 and GPT-2 checkpoints sharing a byte-level BPE tokenizer
    with a chat template (ChatML: a turn ends with <|im_end|>, the checkpoints' second EOS), saved as
    Hugging Face directories: what a user points model.path at, made here (nothing is downloaded)."""
    from services.models import build_bpe_tokenizer, build_checkpoint

    tok = build_bpe_tokenizer(ARITHMETIC, vocab_size=400)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        arch: str(build_checkpoint(arch, tok, root / arch, eos_token_ids=[im_end], seed=i))
        for i, arch in enumerate(("llama", "qwen2", "gpt2"))
    }


@pytest.fixture(scope="session")
def reward_model(checkpoints, tmp_path_factory):
    """A tiny randomly initialised sequence classifier (one score) with the checkpoints' tokenizer,
    saved as a Hugging Face directory: a reward model as a user points task.reward_options at."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(checkpoints["llama"], num_labels=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
    path = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(checkpoints["llama"]).save_pretrained(path)
    return str(path)


@pytest.fixture
def one_thread():
    """Torch on one thread for tiny models: one thread is faster than two that wait on each other
    (on a busy machine, much faster); the setting is restored after the test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
