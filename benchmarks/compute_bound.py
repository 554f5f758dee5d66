"""The compute a step of the example needs, alone: what bounds end-to-end samples/s on this machine.

On `examples/sort.yaml`'s model (`--size`: resized as the TRL comparison does), one torch
thread, in this process, no Ray, no store: CPU milliseconds to generate one step's samples with
the torch engine, to train on them (`TrainerWorker.train_on`: the forward, backward, loss and
optimizer step of a real step, with the example's micro-batching), and to build the trainer's
padded grid (`pack`) for a 64-row micro-batch. Generation is measured with the engine as it runs
(rows that finish leave the forward) and with every row decoded to the end (as before, and as
transformers' `generate` does, which TRL's GRPOTrainer calls without vLLM: also measured, on the
same rows). Generation and training are also measured in bfloat16 mixed precision
(`rollout.autocast`, `trainer.autocast`). CPU time (`time.process_time`), medians of repeats, so
other load on a shared machine moves the figures little.

From these: sync mode cannot pass samples / (generate + train) per second, and async mode on two
cores not samples / max(generate, train), whatever the overheads between the roles.

    .venv/bin/python benchmarks/compute_bound.py [--repeats 7] [--json PATH]
    .venv/bin/python benchmarks/compute_bound.py --size large --warm-start DIR --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncflow.algorithms.sequences import pack  # noqa: E402
from asyncflow.config import AsyncFlowConfig  # noqa: E402
from benchmarks.peers.trl_grpo import SIZES, example_config  # noqa: E402
from services.serving.protocol import Request, SamplingParams  # noqa: E402
from services.serving.torch_engine import TorchEngine  # noqa: E402
from workers.kinds import TokenKind  # noqa: E402
from workers.policy import make_model, make_task, make_tokenizer  # noqa: E402
from workers.trainer import TrainerWorker  # noqa: E402


def cpu_ms(fn, calls: int, repeats: int) -> float:
    """Median over `repeats` of the CPU milliseconds per call of `fn` (`calls` calls each)."""
    fn()  # warm
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        times.append(1000 * (time.process_time() - start) / calls)
    return statistics.median(times)


def setup(size: str, warm_start: Path | None) -> tuple[AsyncFlowConfig, Any, Any, Any]:
    """The config of `size` (examples/sort.yaml resized as benchmarks/peers/trl_grpo.py does), its
    task, tokenizer and model: the warm-started one saved in `warm_start` (the responses a trained
    policy gives, so lengths are realistic), else a freshly initialised one."""
    data = example_config(size)
    if warm_start is not None:
        data["model"] = {"path": str(warm_start)}
    cfg = AsyncFlowConfig.model_validate(data)
    task = make_task(cfg.task, 0)
    tok = make_tokenizer(task, cfg.model)
    return cfg, task, tok, make_model(cfg.model, len(tok), 0)


def hf_generate(model: Any, tok: Any, prompts: list[list[int]], n: int, cfg: AsyncFlowConfig) -> Any:
    """transformers' `generate` on the same rows, as TRL's GRPOTrainer calls it without vLLM
    (left-padded prompts, sampling, every row decoded until the last one stops)."""
    rows = [p for p in prompts for _ in range(n)]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in rows])  # (B, T)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    r = cfg.rollout
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=r.max_new_tokens,
            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, disable_compile=True,
        )  # fmt: skip


def measure(repeats: int, size: str = "small", warm_start: Path | None = None) -> dict[str, float]:
    torch.set_num_threads(1)
    cfg, task, tok, model = setup(size, warm_start)
    engines = {
        drop: TorchEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=1,
                          drop_finished=drop)
        for drop in (True, False)
    }  # fmt: skip
    bf16 = TorchEngine(
        copy.deepcopy(model),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        seed=1,
        autocast="bfloat16",
    )  # its own copy: autocast wraps the model's forward
    params = SamplingParams(temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens)
    kind = TokenKind(tok, cfg.model, cfg.rollout)
    prompts = [kind.prompt_ids(task.example(i).prompt) for i in range(cfg.trainer.batch_prompts)]
    requests = [Request(str(i), p, cfg.rollout.n, params) for i, p in enumerate(prompts)]
    done = asyncio.run(engines[True].generate(requests))
    n, groups = cfg.rollout.n, cfg.trainer.batch_prompts
    data = {
        "prompt_ids": [np.array(c.prompt_ids) for c in done],
        "response_ids": [np.array(c.response_ids) for c in done],
        "behavior_logprobs": [np.array(c.logprobs, dtype=np.float32) for c in done],
        "token_versions": [np.array(c.versions) for c in done],
        "reward": np.random.default_rng(0).random(len(done)).astype(np.float32),
        "prompt_index": np.repeat(np.arange(groups), n),
        "sample_index": np.tile(np.arange(n), groups),
    }
    trainer = TrainerWorker(model, None, None, cfg.trainer, kind, n=n, staleness=1, reference=False)  # type: ignore[arg-type]
    mixed = cfg.trainer.model_copy(update={"autocast": "bfloat16"})
    trainer_bf16 = TrainerWorker(model, None, None, mixed, kind, n=n, staleness=1, reference=False)  # type: ignore[arg-type]
    half = [c.prompt_ids for c in done[:64]], [c.response_ids for c in done[:64]]
    calls = 5 if size == "small" else 1
    return {
        "samples": len(done),
        "response_tokens_mean": sum(len(c.response_ids) for c in done) / len(done),
        "generate_ms": cpu_ms(lambda: asyncio.run(engines[True].generate(requests)), calls, repeats),
        "generate_every_row_to_the_end_ms": cpu_ms(
            lambda: asyncio.run(engines[False].generate(requests)), calls, repeats
        ),
        "hf_generate_ms (TRL's generation)": cpu_ms(
            lambda: hf_generate(model, tok, prompts, n, cfg), calls, repeats
        ),
        "generate_bf16_ms (rollout.autocast)": cpu_ms(
            lambda: asyncio.run(bf16.generate(requests)), calls, repeats
        ),
        "train_ms": cpu_ms(lambda: trainer.train_on(data), calls, repeats),
        "train_bf16_ms (trainer.autocast)": cpu_ms(lambda: trainer_bf16.train_on(data), calls, repeats),
        "pack_64_rows_us": 1000 * cpu_ms(lambda: pack(*half), 200, repeats),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--size", choices=list(SIZES), default="small", help="as benchmarks/e2e.py --peers trl"
    )
    parser.add_argument(
        "--warm-start", type=Path, help="a warm-start saved by benchmarks/e2e.py --peers trl --warm-start"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    f = measure(args.repeats, args.size, args.warm_start)
    f["sync_bound_samples_per_s"] = 1000 * f["samples"] / (f["generate_ms"] + f["train_ms"])
    f["async_2core_bound_samples_per_s"] = 1000 * f["samples"] / max(f["generate_ms"], f["train_ms"])
    print(
        f"| figure (one step of examples/sort.yaml, size {args.size}, CPU, one thread) | value |\n|---|---|"
    )
    for key, value in f.items():
        print(f"| {key} | {value:,.1f} |")
    if args.json:
        args.json.write_text(json.dumps(f, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
