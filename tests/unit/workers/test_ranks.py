"""A trainer over several gloo ranks computes what one rank computes: the same loss, gradient
and update for the same global batch, whatever the balance plan, FSDP or DDP; and a checkpoint
written by N ranks resumes on M ranks with the same parameters and optimizer state.

Each case spawns real processes joined into a torch.distributed group (gloo), one torch
thread each; rank 0 writes what it saw, gathered whole, for the test to compare."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from asyncflow.config import ModelConfig, RolloutConfig, TrainerConfig
from services.models import build_tokenizer
from workers.kinds import TokenKind
from workers.ranks import Ranks
from workers.trainer import TrainerWorker

N = 4  # samples per group
GROUPS = 6


def batch(seed: int, groups: int = GROUPS, vocab: int = 12) -> dict:
    """Groups with long-tailed response lengths, as the store hands them out."""
    rng = np.random.default_rng(seed)
    rows = groups * N
    prompts = [rng.integers(3, vocab, size=rng.integers(2, 6)) for _ in range(rows)]
    lengths = np.minimum(1 + rng.lognormal(1.5, 0.8, size=rows).astype(int), 40)
    responses = [rng.integers(3, vocab, size=n) for n in lengths]
    return {
        "prompt_ids": [p.astype(np.int64) for p in prompts],
        "response_ids": [r.astype(np.int64) for r in responses],
        "behavior_logprobs": [(-rng.random(len(r)) * 3).astype(np.float32) for r in responses],
        "token_versions": [np.zeros(len(r), dtype=np.int64) for r in responses],
        "reward": rng.random(rows).astype(np.float32),
        "prompt_index": np.repeat(np.arange(groups), N),
        "sample_index": np.tile(np.arange(N), groups),
    }


def share(data: dict, rank: int, ranks: int) -> dict:
    """The groups a rank's store read would give it (whole groups, split as the trainer asks)."""
    groups = len(data["reward"]) // N
    counts = [groups // ranks + (r < groups % ranks) for r in range(ranks)]
    start = sum(counts[:rank]) * N
    rows = slice(start, start + counts[rank] * N)
    return {k: v[rows] for k, v in data.items()}


def trainer(rank: int, ranks: int, config: TrainerConfig) -> TrainerWorker:
    torch.manual_seed(0)
    tok = build_tokenizer(list("0123456789"))
    model = ModelConfig(hidden_size=64, intermediate_size=64, num_layers=2, num_heads=2)
    kind = TokenKind(tok, model, RolloutConfig(), chunk_tokens=config.logprob_chunk_tokens)
    return TrainerWorker(
        kind.model(0), None, None, config, kind, n=N, staleness=0, reference=False,
        ranks=Ranks(rank, ranks, config.parallel),
    )  # fmt: skip


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def optimizer_state(worker: TrainerWorker) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=worker.ranks.many)
    state = get_optimizer_state_dict(worker.model, worker.optimizer, options=options).get("state", {})
    return {name: {k: full(v) for k, v in s.items()} for name, s in state.items()}


def run_rank(rank: int, ranks: int, port: int, config: dict, out: str, steps: int, load: str | None,
             save: str | None) -> None:  # fmt: skip
    torch.set_num_threads(1)
    cfg = TrainerConfig.model_validate(config)
    worker = trainer(rank, ranks, cfg)
    worker.ranks.join(f"127.0.0.1:{port}", timeout_s=120)
    if load:
        worker.load(load)
    metrics = []
    for step in range(steps):
        m = worker.train_on(worker.ranks.merge(share(batch(step), rank, ranks)))
        metrics.append({k: v for k, v in m.items() if isinstance(v, float)})
    if save:
        worker.save(save)
    params = {n: full(p) for n, p in worker.model.named_parameters()}
    grads = {n: full(p.grad) for n, p in worker.model.named_parameters() if p.grad is not None}
    state = optimizer_state(worker) if worker.optimizer.state else {}
    if rank == 0:
        torch.save({"metrics": metrics, "params": params, "grads": grads, "optimizer": state}, out)
    worker.close()


def spawn(ranks: int, config: dict, tmp: Path, *, steps: int = 1, load: str | None = None,
          save: str | None = None) -> dict:  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp / f"rank0-{ranks}-{port}.pt")
    if ranks == 1:
        run_rank(0, 1, port, config, out, steps, load, save)
    else:
        mp.spawn(run_rank, args=(ranks, port, config, out, steps, load, save), nprocs=ranks)
    return torch.load(out, weights_only=True)


def assert_same(one: dict, many: dict, *, atol: float) -> None:
    for a, b in zip(one["metrics"], many["metrics"]):
        for key in ("loss", "grad_norm", "reward_mean", "clip_frac"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for name, g in one["grads"].items():
        torch.testing.assert_close(many["grads"][name], g, atol=1e-6, rtol=1e-4, msg=f"grad of {name}")
    for name, p in one["params"].items():
        torch.testing.assert_close(many["params"][name], p, atol=atol, rtol=0, msg=f"parameter {name}")


BASE = {"batch_prompts": GROUPS, "lr": 1e-3, "micro_batch_tokens": 64}
MEMORY = {"gradient_checkpointing": True, "logprob_chunk_tokens": 16}  # the LM head called on its own
CASES = [  # ranks, parallel, balance, loss aggregation, optimizer steps per batch, more
    (2, "fsdp", "cost", "token-mean", 1, {}),
    (2, "ddp", "tokens", "seq-mean-token-sum", 1, {}),
    (2, "fsdp", "count", "seq-mean-token-mean", 2, {}),
    (2, "fsdp", "cost", "token-mean", 1, MEMORY),
    (4, "fsdp", "tokens", "token-mean", 1, {}),
    (4, "ddp", "cost", "token-mean", 2, {}),
]


@pytest.mark.parametrize(("ranks", "parallel", "balance", "agg", "minibatches", "more"), CASES)
def test_ranks_train_as_one(tmp_path, ranks, parallel, balance, agg, minibatches, more):
    """Loss, gradient norm and gradients within float32 summation-order noise (rtol 1e-4, atol
    1e-6); parameters after two AdamW steps (lr 1e-3) within 1e-5."""
    config = {**BASE, "loss_agg": agg, "minibatches": minibatches, "parallel": parallel, "balance": balance}
    config.update(more)
    one = spawn(1, config, tmp_path, steps=2)
    many = spawn(ranks, {**config, "num_ranks": ranks}, tmp_path, steps=2)
    assert_same(one, many, atol=1e-5)


@pytest.mark.parametrize(("written", "read", "parallel"), [(2, 1, "fsdp"), (2, 3, "fsdp"), (1, 2, "ddp")])
def test_a_checkpoint_of_n_ranks_resumes_on_m(tmp_path, written, read, parallel):
    """Parameters and every optimizer state tensor come back exactly (bitwise), on another number of
    ranks, and the next step is the step the writer would have taken."""
    config = {**BASE, "parallel": parallel}
    ckpt = str(tmp_path / "ckpt")
    saved = spawn(written, {**config, "num_ranks": written}, tmp_path, steps=1, save=ckpt)
    resumed = spawn(read, {**config, "num_ranks": read}, tmp_path, steps=0, load=ckpt)
    for name, p in saved["params"].items():
        assert torch.equal(resumed["params"][name], p), name
    assert saved["optimizer"].keys() == resumed["optimizer"].keys()
    for name, state in saved["optimizer"].items():
        for k, v in state.items():
            assert torch.equal(resumed["optimizer"][name][k], v), f"{name}.{k}"
