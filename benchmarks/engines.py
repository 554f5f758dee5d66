"""Rollout engines side by side: the torch engine and vLLM (in process) on the same model and prompts.

Every measurement runs in a fresh child process per engine: vLLM replaces torch.set_num_threads
in the process that hosts it, and each engine should start from the same cold state. Both run
one torch/OpenMP thread, as a rollout worker does by default (rollout.torch_threads = 1).

  generate  tokens/s of generate() on sort-task prompts (B prompts x n samples), median of
            --repeats rounds after one warm-up round, for three workloads: the example's model
            and response length, the same model with 64-token responses, and a wider model.
            Weights are random, so responses end at EOS at random (~1 token in vocabulary size);
            tokens/s counts the tokens each engine actually produced.
  update    update_weights(version, state_dict) of the wide model while idle: median latency,
            and its MB/s against this machine's memcpy rate (torch copy_ between two buffers of
            the same size, and of 256 MiB).
  e2e       examples/sort.yaml end to end with each engine (asyncflow.recipes.grpo.train):
            samples/s over the RL loop, held-out reward before and after, and mean mismatch_kl.

    flock /tmp/asyncflow-bench.lock .venv/bin/python benchmarks/engines.py --json docs/bench-engines.json
    .venv/bin/python benchmarks/engines.py --parts generate,update --repeats 3   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("torch", "vllm")
# name: (model shape, prompts, samples per prompt, max new tokens)
WORKLOADS = {
    "example": ({"hidden_size": 64, "intermediate_size": 256, "num_layers": 2, "num_heads": 2}, 16, 8, 8),
    "long": ({"hidden_size": 64, "intermediate_size": 256, "num_layers": 2, "num_heads": 2}, 16, 8, 64),
    "wide": ({"hidden_size": 256, "intermediate_size": 1024, "num_layers": 4, "num_heads": 4}, 16, 8, 64),
}
MAX_POSITIONS = 80


# ---------------------------------------------------------------- child side (one engine)


def build_engine(engine: str, shape: dict, workdir: Path) -> tuple[Any, Any, Any]:
    """(engine, model, tokenizer) for a random model of `shape`; vLLM loads it from `workdir`."""
    from asyncflow.tasks.sorting import SortDigits
    from services.models import build_model, save_model
    from workers.policy import make_tokenizer

    tok = make_tokenizer(SortDigits())
    model = build_model(len(tok), max_positions=MAX_POSITIONS, seed=0, **shape)
    if engine == "vllm":
        from services.serving.vllm import VLLMEngine

        return VLLMEngine(save_model(model, tok, workdir), eos_token_id=tok.eos_token_id, seed=0), model, tok
    from services.serving.torch_engine import TorchEngine

    return (
        TorchEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=0),
        model,
        tok,
    )


async def child_generate(engine_name: str, workload: str, repeats: int, workdir: Path) -> dict:
    from asyncflow.tasks.sorting import SortDigits
    from services.serving import Request, SamplingParams

    shape, prompts, n, max_new = WORKLOADS[workload]
    start = time.perf_counter()
    engine, _, tok = build_engine(engine_name, shape, workdir)
    start_s = time.perf_counter() - start
    task = SortDigits()
    params = SamplingParams(max_new_tokens=max_new)
    rounds = []
    for r in range(repeats + 1):  # round 0 warms up
        requests = [
            Request(
                f"{r}.{i}", [tok.bos_token_id, *tok.encode(task.example(r * prompts + i).prompt)], n, params
            )
            for i in range(prompts)
        ]
        t = time.perf_counter()
        out = await engine.generate(requests)
        rounds.append((sum(len(c.response_ids) for c in out), time.perf_counter() - t))
    await engine.close()
    rates = [tokens / s for tokens, s in rounds[1:]]
    return {
        "engine": engine_name, "workload": workload, "start_s": start_s, "first_round_s": rounds[0][1],
        "tokens_per_s": statistics.median(rates),
        "tokens_per_round": statistics.median(t for t, _ in rounds[1:]),
        "sequences": prompts * n, "max_new_tokens": max_new,
    }  # fmt: skip


async def child_update(engine_name: str, repeats: int, workdir: Path) -> dict:
    from services.models import build_model

    shape = WORKLOADS["wide"][0]
    engine, _, tok = build_engine(engine_name, shape, workdir)
    # Two state dicts of their own: the torch engine's model is not among them, so every copy is real.
    states = [
        build_model(len(tok), max_positions=MAX_POSITIONS, seed=s, **shape).state_dict() for s in (1, 2)
    ]
    nbytes = sum(t.numel() * t.element_size() for t in states[0].values())
    times = []
    for v in range(1, repeats + 2):
        t = time.perf_counter()
        await engine.update_weights(v, states[v % 2])
        times.append(time.perf_counter() - t)
    await engine.close()
    return {
        "engine": engine_name, "mb": nbytes / 2**20, "update_s": statistics.median(times[1:]),
        "memcpy_same_size_s": memcpy_s(nbytes, repeats),
        "memcpy_256mib_gb_per_s": 2**28 / memcpy_s(2**28, 5) / 1e9,
    }  # fmt: skip


def memcpy_s(nbytes: int, repeats: int) -> float:
    import torch

    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def child_e2e(engine_name: str, steps: int | None, seed: int, out_dir: Path) -> dict:
    from asyncflow.config import load_config
    from asyncflow.recipes.grpo import train

    overrides = [f"output_dir={out_dir}", f"dataplane.name=bench-engines-{uuid.uuid4().hex[:8]}",
                 f"rollout.engine={engine_name}", f"seed={seed}"]  # fmt: skip
    if steps:
        overrides.append(f"trainer.steps={steps}")
    summary = train(load_config(ROOT / "examples" / "sort.yaml", overrides), display=False)
    metrics = [
        json.loads(line) for line in Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines()
    ]
    return {
        "engine": engine_name, "seed": seed, "steps": summary["steps"],
        "samples_per_s": summary["samples_per_s"],
        "eval_reward_before": summary["eval_reward_before"],
        "eval_reward_after": summary["eval_reward_after"],
        "mismatch_kl_mean": statistics.mean(m["mismatch_kl"] for m in metrics), "seconds": summary["seconds"],
    }  # fmt: skip


def child(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        if args.child == "generate":
            return asyncio.run(child_generate(args.engine, args.workload, args.repeats, Path(tmp)))
        if args.child == "update":
            return asyncio.run(child_update(args.engine, args.repeats, Path(tmp)))
        return child_e2e(args.engine, args.e2e_steps, args.seed, Path(tmp))


# ---------------------------------------------------------------- parent side


def run_child(part: str, engine: str, args: argparse.Namespace, workload: str = "", seed: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", part, "--engine", engine, "--repeats", str(args.repeats)]
    cmd += ["--seed", str(seed)]
    if workload:
        cmd += ["--workload", workload]
    if args.e2e_steps:
        cmd += ["--e2e-steps", str(args.e2e_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{part}/{engine}/{workload or seed} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tables(results: dict[str, list[dict]]) -> str:
    lines = []
    if results.get("generate"):
        lines += [
            "| workload | sequences x max tokens | engine | start s | 1st round s | tokens/round | tok/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["generate"]:
            lines.append(
                f"| {r['workload']} | {r['sequences']} x {r['max_new_tokens']} | {r['engine']} "
                f"| {r['start_s']:.1f} | {r['first_round_s']:.2f} | {r['tokens_per_round']:.0f} "
                f"| {r['tokens_per_s']:,.0f} |"
            )
        by = {(r["workload"], r["engine"]): r["tokens_per_s"] for r in results["generate"]}
        for w in WORKLOADS:
            if (w, "torch") in by and (w, "vllm") in by:
                lines.append(f"| {w} | | vllm / torch | | | | {by[w, 'vllm'] / by[w, 'torch']:.2f}x |")
        lines.append("")
    if results.get("update"):
        lines += [
            "| engine | weights MB | update s | update MB/s | memcpy same size MB/s | memcpy 256 MiB GB/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["update"]:
            lines.append(
                f"| {r['engine']} | {r['mb']:.1f} | {r['update_s']:.4f} | {r['mb'] / r['update_s']:,.0f} "
                f"| {r['mb'] / r['memcpy_same_size_s']:,.0f} | {r['memcpy_256mib_gb_per_s']:.1f} |"
            )
        lines.append("")
    if results.get("e2e"):
        lines += [
            "| engine | seed | steps | samples/s | eval before | eval after | mean mismatch_kl | run s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results["e2e"]:
            lines.append(
                f"| {r['engine']} | {r['seed']} | {r['steps']} | {r['samples_per_s']:.1f} "
                f"| {r['eval_reward_before']:.3f} | {r['eval_reward_after']:.3f} "
                f"| {r['mismatch_kl_mean']:.2e} | {r['seconds']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="generate,update,e2e", help="comma-separated: generate,update,e2e")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (generate, update)")
    parser.add_argument(
        "--e2e-steps", type=int, default=0, help="RL steps of the e2e runs (0: the example's)"
    )
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds of the e2e runs")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", choices=["generate", "update", "e2e"], help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    engines = args.engines.split(",")
    results: dict[str, list[dict]] = {}
    for part in args.parts.split(","):
        jobs = [("", e, 0) for e in engines]
        if part == "generate":
            jobs = [(w, e, 0) for w in args.workloads.split(",") for e in engines]
        if part == "e2e":
            jobs = [("", e, int(s)) for s in args.seeds.split(",") for e in engines]
        for workload, engine, seed in jobs:
            results.setdefault(part, []).append(run_child(part, engine, args, workload, seed))
            print(f"done: {part} {engine} {workload or seed}", file=sys.stderr, flush=True)
    print(tables(results))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
