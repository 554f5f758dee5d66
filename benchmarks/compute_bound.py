"""The compute a step of the example needs, alone: what bounds end-to-end samples/s on this machine.

On `examples/sort.yaml`'s model (one torch thread, in this process, no Ray, no store): CPU
milliseconds to generate one step's samples with the torch engine, to train on them
(`TrainerWorker.train_on`: the forward, backward, loss and optimizer step of a real step, with
the example's micro-batching), and to build the trainer's padded grid (`pack`) for a 64-row
micro-batch. CPU time (`time.process_time`), medians of repeats, so other load on a shared
machine moves the figures little.

From these: sync mode cannot pass samples / (generate + train) per second, and async mode on two
cores not samples / max(generate, train), whatever the overheads between the roles.

    .venv/bin/python benchmarks/compute_bound.py [--repeats 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncflow.algorithms.sequences import pack  # noqa: E402
from asyncflow.config import AsyncFlowConfig  # noqa: E402
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


def measure(repeats: int) -> dict[str, float]:
    torch.set_num_threads(1)
    cfg = AsyncFlowConfig.model_validate(yaml.safe_load((ROOT / "examples" / "sort.yaml").read_text()))
    task = make_task(cfg.task, 0)
    tok = make_tokenizer(task, cfg.model)
    model = make_model(cfg.model, len(tok), 0)
    engine = TorchEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=1)
    params = SamplingParams(temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens)
    prompts = [
        [tok.bos_token_id, *tok.encode(task.example(i).prompt)] for i in range(cfg.trainer.batch_prompts)
    ]
    requests = [Request(str(i), p, cfg.rollout.n, params) for i, p in enumerate(prompts)]
    done = asyncio.run(engine.generate(requests))
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
    trainer = TrainerWorker(
        model,
        None,
        None,
        cfg.trainer,
        TokenKind(tok, cfg.model, cfg.rollout),
        n=n,
        staleness=1,
        reference=False,
    )
    half = [c.prompt_ids for c in done[:64]], [c.response_ids for c in done[:64]]
    return {
        "samples": len(done),
        "generate_ms": cpu_ms(lambda: asyncio.run(engine.generate(requests)), 5, repeats),
        "train_ms": cpu_ms(lambda: trainer.train_on(data), 5, repeats),
        "pack_64_rows_us": 1000 * cpu_ms(lambda: pack(*half), 200, repeats),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    f = measure(args.repeats)
    f["sync_bound_samples_per_s"] = 1000 * f["samples"] / (f["generate_ms"] + f["train_ms"])
    f["async_2core_bound_samples_per_s"] = 1000 * f["samples"] / max(f["generate_ms"], f["train_ms"])
    print("| figure (one step of examples/sort.yaml, CPU, one thread) | value |\n|---|---|")
    for key, value in f.items():
        print(f"| {key} | {value:,.1f} |")
    if args.json:
        args.json.write_text(json.dumps(f, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
