"""The plug-in context encoder on digits inpainting: the table of `benchmarks/flow.py --only encoder`.

Per seed: an unconditional velocity MLP (3 x 256) is pre-trained on the 1,297 training
digits by I-CFM (`--digits-iters` Adam steps, the flow kind's warm-start), then two arms
start from it and get the same time for each phase (CPU seconds of this one-thread process, so
that other load on a shared machine does not favour the arm that ran while it was quiet; on an
idle machine it is the wall time; the arms also alternate which runs first):

    encoder  only the context encoder trains (services.flow.encoder; trainer.trainable
             {patterns: ["encoder.*"]}), the backbone stays frozen, each update publishes the
             encoder's tensors alone
    full     the same model, every parameter trains (trainer.trainable: all), each update
             publishes everything

Phase 1, supervised (`--encoder-sup-s` seconds): Adam on the inpainting flow-matching loss
(hidden pixels weight 1, known 0.1). Phase 2, RL (`--encoder-rl-s` seconds): Flow-GRPO with
the real trainer (workers.trainer.TrainerWorker.train_on, per-step PPO-clip on recomputed
SDE log-probs) and the real engine (FlowEngine, K = 10 SDE steps, a = 0.7), on-policy
(every update is published to the engine before the next rollout: whole once, then what
the arm trains), 8 prompts x 8 samples per update; reward asyncflow.tasks.inpainting:reward
(the reward classifier's probability of the intended digit minus the squared error on the
known pixels).

Measured on the 500 test digits, each with a fixed 4 x 4 hidden square, 10-step Euler ODE
samples from fixed noise, judged by benchmarks/flow_digits.py's classifier (another seed
than the reward's): agreement (its accuracy against the intended labels), MSE on the hidden
pixels and on the known ones against the clean digit, FD to the clean test digits; and the
bytes one update publishes, the updates done in the time.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import time
from typing import Any

import numpy as np
import torch

from asyncflow.config import EncoderConfig, FlowConfig, Patterns, TrainerConfig, WarmupConfig
from asyncflow.tasks.inpainting import DigitInpainting, reward
from benchmarks.flow_digits import Judge
from services.flow import euler, uniform_grid
from services.flow.encoder import EncoderFlow, inpainting_loss
from workers.flow_kind import FlowKind
from workers.trainable import publication
from workers.trainer import TrainerWorker

ARMS = ("encoder", "full")
GROUPS, SAMPLES = 8, 8  # prompts and samples per prompt of one RL update


def trainable_of(arm: str) -> Any:
    return Patterns(patterns=("encoder.*",)) if arm == "encoder" else "all"


def pretrained(args: Any, seed: int) -> tuple[FlowKind, EncoderFlow]:
    """The flow kind for the task and its model with the backbone pre-trained, encoder at zero."""
    task = DigitInpainting(seed=seed)
    config = FlowConfig(hidden_size=256, num_layers=3, steps=10, encoder=EncoderConfig(supervised_steps=0))
    kind = FlowKind(config, task)
    model: Any = kind.model(seed)
    torch.manual_seed(seed)
    kind.warmup(model, task, WarmupConfig(steps=args.digits_iters, batch_size=256, lr=1e-3))
    return kind, model


def supervise(model: EncoderFlow, arm: str, task: DigitInpainting, budget_s: float, seed: int) -> int:
    """Adam on the inpainting loss for `budget_s` CPU seconds, over what the arm trains; returns the steps."""
    params = list(model.encoder.parameters() if arm == "encoder" else model.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    loss = functools.partial(inpainting_loss, known_weight=0.1)
    generator = torch.Generator().manual_seed(seed)
    started, step = time.process_time(), 0
    while time.process_time() - started < budget_s:
        x, cond = (torch.as_tensor(a) for a in task.data(10_000 + step, 256))
        value = loss(model, x, torch.randn(x.shape, generator=generator), cond, generator)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        step += 1
    return step


async def rollout(kind: FlowKind, engine: Any, first: int) -> dict[str, Any]:
    """One update's groups, as the trainer reads them from the store."""
    examples = [kind.task.example(first + i) for i in range(GROUPS)]
    prompts = kind.prompts(examples)["condition"]
    outputs = await engine.generate(
        [kind.request(str(i), p, SAMPLES, kind.params()) for i, p in enumerate(prompts)]
    )
    data: dict[str, Any] = {k: list(v) for k, v in kind.results(outputs).items()}
    data["condition"] = [prompts[int(s.request_id)] for s in outputs]
    data["prompt_index"] = np.array([int(s.request_id) for s in outputs])
    data["sample_index"] = np.array([s.index for s in outputs])
    parts = [
        reward(*kind.reward_args(c, x, examples[int(s.request_id)].answer))
        for c, x, s in zip(data["condition"], data["sample"], outputs)
    ]
    data["reward"] = np.array([sum(p.values()) for p in parts], dtype=np.float32)
    return data


async def reinforce(kind: FlowKind, model: EncoderFlow, arm: str, budget_s: float, seed: int) -> dict:
    """Flow-GRPO for `budget_s` CPU seconds; returns updates, bytes per update and the reward trend."""
    trainable = trainable_of(arm)
    config = TrainerConfig(batch_prompts=GROUPS, lr=1e-4, clip_eps=0.2, trainable=trainable)
    trainer = TrainerWorker(model, None, None, config, kind, n=SAMPLES, staleness=0, reference=False)
    engine = kind.engine(seed)
    await engine.update_weights(0, publication(trainer.model, trainable, whole=True))
    rewards, sizes, started = [], [], time.process_time()
    while time.process_time() - started < budget_s:
        data = await rollout(kind, engine, len(rewards) * GROUPS)
        trainer.train_on(data)
        tensors = publication(trainer.model, trainable, whole=False)
        sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        await engine.update_weights(trainer.version, tensors)
        rewards.append(float(np.mean(data["reward"])))
    tenth = max(1, len(rewards) // 10)
    return {
        "updates": len(rewards),
        "bytes_per_update": int(np.median(sizes)) if sizes else 0,
        "reward_first_10pct": float(np.mean(rewards[:tenth])) if rewards else None,
        "reward_last_10pct": float(np.mean(rewards[-tenth:])) if rewards else None,
    }


@torch.no_grad()
def quality(model: EncoderFlow, task: DigitInpainting, judge: Judge) -> dict[str, float]:
    examples = [task.eval_example(i) for i in range(len(judge.test))]
    cond = torch.tensor([e.condition for e in examples])  # (500, 128)
    noise = torch.randn(len(examples), 64, generator=torch.Generator().manual_seed(2024))
    x = euler(model, noise, uniform_grid(10), cond).numpy()
    known = cond[:, 64:].numpy()
    err = (x - judge.test) ** 2
    return {
        "agreement": judge.score_labels(x),
        "mse_hidden": float((err * (1 - known)).sum() / (1 - known).sum()),
        "mse_known": float((err * known).sum() / known.sum()),
        "fd": judge.fd(x),
    }


def encoder_run(args: Any, seed: int, judge: Judge) -> dict[str, Any]:
    kind, base = pretrained(args, seed)
    task: Any = kind.task
    row: dict[str, Any] = {"backbone": quality(base, task, judge)}
    for arm in ARMS if seed % 2 == 0 else ARMS[::-1]:
        model = copy.deepcopy(base)
        sup_steps = supervise(model, arm, task, args.encoder_sup_s, seed)
        supervised = quality(model, task, judge)
        rl = asyncio.run(reinforce(kind, model, arm, args.encoder_rl_s, seed))
        trained = [p for p in model.parameters() if p.requires_grad]
        row[arm] = {
            "supervised_steps": sup_steps, "supervised": supervised, **rl, "rl": quality(model, task, judge),
            "trained_parameters": sum(p.numel() for p in trained),
        }  # fmt: skip
    return row


def encoder_table(args: Any, judge: Judge, median) -> dict[str, Any]:
    runs = [encoder_run(args, s, judge) for s in range(args.seeds)]
    print(
        f"\nPlug-in context encoder vs full fine-tuning, digits inpainting (4x4 hidden square; backbone "
        f"{args.digits_iters} Adam steps; {args.encoder_sup_s:g} s supervised + {args.encoder_rl_s:g} s "
        f"Flow-GRPO per arm; {args.seeds} seed(s), median). Judge: agreement with the intended digit, "
        f"MSE on hidden / known pixels, FD (floor {judge.floor():.1f})\n"
    )
    print("| arm | phase | updates | bytes / update | agreement | MSE hidden | MSE known | FD |")
    print("|---|---|---|---|---|---|---|---|")
    summary: dict[str, Any] = {}
    metrics = ("agreement", "mse_hidden", "mse_known", "fd")
    cells = {m: median([r["backbone"][m] for r in runs]) for m in metrics}
    summary["backbone"] = cells
    print("| backbone | zero-init encoder | - | - | " + " | ".join(f"{cells[m]:.3f}" for m in metrics) + " |")
    for arm in ARMS:
        for phase, steps in (("supervised", "supervised_steps"), ("rl", "updates")):
            cell = {m: median([r[arm][phase][m] for r in runs]) for m in metrics}
            cell["steps"] = median([r[arm][steps] for r in runs])
            cell["bytes"] = median([r[arm]["bytes_per_update"] for r in runs])
            summary[f"{arm}/{phase}"] = cell
            size = f"{cell['bytes']:,.0f}" if phase == "rl" else "-"
            print(
                f"| {arm} | {phase} | {cell['steps']:.0f} | {size} | "
                + " | ".join(f"{cell[m]:.3f}" for m in metrics) + " |"
            )  # fmt: skip
    for arm in ARMS:
        first = median([r[arm]["reward_first_10pct"] for r in runs])
        last = median([r[arm]["reward_last_10pct"] for r in runs])
        trained = median([r[arm]["trained_parameters"] for r in runs])
        print(
            f"{arm}: {trained:,.0f} trained parameters; RL reward, first to last tenth of the updates: "
            f"{first:.3f} -> {last:.3f}"
        )
    return {"median": summary, "runs": runs, "fd_floor": judge.floor()}
