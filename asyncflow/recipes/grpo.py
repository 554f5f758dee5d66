"""GRPO, asynchronous or synchronous: the loops that drive a run, each on one screen.

async: rollout, reward (and reference) workers stream on their own; the source admits
prompts within the staleness bound; this loop only asks the trainer for steps.
sync:  the same workers, strictly alternating generate -> reward -> train -> sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from asyncflow import workflow
from asyncflow.config import AsyncFlowConfig
from asyncflow.control import Steering, StopRun
from asyncflow.display import RunView
from asyncflow.errors import AsyncFlowError, ConfigError, DataPlaneError, WorkerError
from asyncflow.plot import line_chart
from asyncflow.rundir import RunDir
from workers.samples import PARTITION, consumers, schema


async def run_async(wf: workflow.Workflow, start: int, steps: int, on_step) -> None:
    # One supervising task per looping actor, in wf.loops: a steered run adds and removes some.
    for actor in wf.streamers:
        wf.loops[actor] = asyncio.ensure_future(supervise(actor, wf.config.rollout.max_restarts))
    wf.loops[wf.source] = asyncio.ensure_future(supervise(wf.source, 0))
    try:
        for step in range(start + 1, steps + 1):
            metrics = await _first(wf.trainer.call.remote("step"), list(wf.loops.values()))
            await on_step(step, metrics)
    finally:
        # Stop admitting first: a source cancelled inside a put would leave rows in the store
        # beyond its cursor, and a later resume would admit those prompts again.
        await asyncio.gather(wf.source.call.remote("pause"), return_exceptions=True)
        loops = list(wf.loops.values())
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)


async def run_sync(wf: workflow.Workflow, start: int, steps: int, on_step) -> None:
    groups, n = wf.config.trainer.batch_prompts, wf.config.rollout.n
    for step in range(start + 1, steps + 1):
        await wf.source.call.remote("admit", groups, step - 1)
        await asyncio.gather(
            *(r.call.remote("work", g) for r, g in zip(wf.rollouts, split(groups, len(wf.rollouts))))
        )
        await asyncio.gather(
            *(w.call.remote("work", k) for w, k in zip(wf.rewards, split(groups * n, len(wf.rewards))))
        )
        await asyncio.gather(*(r.call.remote("work", groups * n) for r in wf.references))
        metrics = await wf.trainer.call.remote("step")
        await asyncio.gather(*(r.call.remote("sync_weights", step) for r in wf.rollouts))
        await on_step(step, metrics)


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


async def supervise(actor: Any, restarts: int) -> None:
    """Keep `actor.run()` going; Ray restarts a dead actor, this calls run() on the new one."""
    failures = 0
    while True:
        ref = actor.call.remote("run")
        try:
            await ref
            return
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise
        except ray.exceptions.ActorUnavailableError:
            await asyncio.sleep(0.5)  # Ray is restarting it: ask again shortly
        except ray.exceptions.RayActorError as e:
            failures += 1
            if failures > restarts:
                raise WorkerError(f"a worker died {failures} times (limit {restarts}): {e}") from None


async def _first(ref: Any, loops: Sequence[asyncio.Future]) -> Any:
    """Await `ref`, but fail at once if a background loop failed meanwhile."""
    step = asyncio.ensure_future(ref)
    done, _ = await asyncio.wait([step, *loops], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not step and task.exception() is not None:
            if step.done():
                step.exception()  # retrieved: the loop's failure is the one reported
            step.cancel()
            raise task.exception()  # type: ignore[misc]
    return await step


class Run:
    """One run: prepares the workers (warm-start or resume), loops, checkpoints, summarises."""

    def __init__(self, config: AsyncFlowConfig, run: RunDir, view: RunView):
        self.config, self.run, self.view = config, run, view
        self.recent: deque[float] = deque(maxlen=10)
        self.samples = self.tokens = 0
        self.trainer_wait_s = 0.0  # time the trainer spent waiting for data
        self.started = time.perf_counter()
        self.workers: dict[str, str] = {}
        self._stats_at = 0.0
        self.steering: Steering | None = None  # applies what clients ask (asyncflow.control)
        self.checkpointed = -1  # step of the last checkpoint taken
        self.interrupted = False  # Ctrl-C: stop at the next step boundary, with a checkpoint

    async def main(self, resume: bool) -> dict:
        try:
            return await self._main(resume)
        except ray.exceptions.RayActorError as e:  # an actor died (and Ray will not restart it)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WorkerError(
                f"{self.wf.role_of(e.actor_id)} died ({reason}); {self.resume_hint()}"
            ) from None
        except ray.exceptions.RayTaskError as e:  # a worker raised: its own error, without Ray's stack
            cause = e.cause
            if not isinstance(cause, AsyncFlowError):
                raise
            raise type(cause)(f"{cause}; {self.resume_hint()}") from None
        except (DataPlaneError, WorkerError) as e:
            raise type(e)(f"{e}; {self.resume_hint()}") from None

    def resume_hint(self) -> str:
        last = self.run.latest_checkpoint()
        where = f"its last checkpoint is step {last[1]['step']}" if last else "it has no checkpoint yet"
        return f"the run stopped ({where}): continue it with `asyncflow run --resume {self.run.path}`"

    def _on_ctrl_c(self) -> None:
        self.interrupted = True
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)  # a second Ctrl-C stops at once
        self.view.note("Ctrl-C: stopping after this step with a checkpoint (press it again to stop now)")

    async def _main(self, resume: bool) -> dict:
        config, run = self.config, self.run
        with contextlib.suppress(ValueError, NotImplementedError, RuntimeError):  # main thread only
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._on_ctrl_c)
        state = run.latest_checkpoint(on_skip=self.view.note) if resume else None
        if resume and state is None:
            self.view.note(f"{run.path}: no usable checkpoint; starting again from step 0")
            run.truncate_logs(0)
        cursor = state[1]["cursor"] if state else 0
        wf = workflow.start(config, cursor=cursor)
        self.wf, ended = wf, "failed"
        try:
            self.steering = Steering(wf, str(run.path), checkpoint=self.checkpoint, supervise=supervise)
            await wf.ready()
            client = await wf.store.async_client()
            self.client = client
            if state is None:
                start = await self._fresh(client)
            else:
                start = await self._resume(client, *state)
            if config.reference.enabled:
                wf.references = [
                    wf.spawn(
                        "reference",
                        num_cpus=config.reference.num_cpus,
                        extra={"weights_path": str(run.reference_weights)},
                    )  # fmt: skip
                ]
                await wf.ready()
            evals = config.task.eval_prompts
            before = await wf.rollouts[0].evaluate.remote(evals, start) if evals else None
            self.view.note(f"{run.path}: step {start}/{config.trainer.steps}, eval reward before {before}")
            self.started = time.perf_counter()
            await self.steering.started(start)
            loop = run_async if config.mode == "async" else run_sync
            try:
                with self.view:
                    await loop(wf, start, config.trainer.steps, self.on_step)
            except StopRun as stop:  # a client or Ctrl-C asked: checkpoint here and end; --resume continues
                path = await self.checkpoint(stop.step)
                reply = {"step": stop.step, "checkpoint": str(path)}
                await self.steering.reply(stop.requests, [reply] * len(stop.requests))
                ended = "stopped"
                by = "ctrl-c" if self.interrupted else "client"
                return await self.finish(
                    self.summary(before, None) | {"stopped_at_step": stop.step, "stopped_by": by}
                )
            after = await wf.rollouts[0].evaluate.remote(evals, config.trainer.steps) if evals else None
            await self.checkpoint(config.trainer.steps)
            ended = "finished"
            return await self.finish(self.summary(before, after))
        finally:
            if self.steering is not None:
                await self.steering.close(ended)
            await wf.shutdown()

    async def finish(self, summary: dict) -> dict:
        """Plot, count what is left untrained, write the summary, drop the store's partition."""
        client = self.client
        self.plot(summary["eval_reward_before"], summary["eval_reward_after"])
        stats = (await client.store_stats())["partitions"][PARTITION]["consumers"]["trainer"]
        summary["admitted_prompts"] = await self.wf.source.call.remote("pause")
        summary["untrained_rows"] = stats["pending"] + stats["leased"]  # kept in the final checkpoint
        self.run.write_summary(summary)
        await client.drop_partition(PARTITION)  # its rows live on in the final checkpoint
        await client.close()
        return summary

    async def _fresh(self, client) -> int:
        wf = self.wf
        if PARTITION in (await client.store_stats())["partitions"]:  # a durable store (Redis) outlives runs
            raise ConfigError(
                f"store {self.config.dataplane.name!r} already holds a {PARTITION!r} partition (another run "
                "uses it, or one ended without cleaning up); set dataplane.name to a name of its own, or "
                "continue that run with --resume"
            )
        await client.create_partition(
            PARTITION,
            schema(self.config.policy),
            consumers=consumers(self.config.reference.enabled),
            stale_policy="regenerate",
        )
        warm = await wf.trainer.warmup.remote()
        self.view.note(f"warm-start: {warm}")
        if self.config.reference.enabled:
            await wf.trainer.call.remote("save_weights", str(self.run.reference_weights))
        await wf.trainer.call.remote("publish")
        return 0

    async def _resume(self, client, path, state: dict) -> int:
        # The checkpoint is the consistent cut (model, cursor and rows together): whatever a durable
        # store still holds from after it is replaced by it.
        if PARTITION in (await client.store_stats())["partitions"]:
            await client.drop_partition(PARTITION)
        await client.restore(str(path / "store"))
        version = await self.wf.trainer.call.remote("load", str(path / "trainer"))
        await self.wf.trainer.call.remote("publish")
        self.run.truncate_logs(state["step"])
        self.view.note(f"resumed from {path} (step {state['step']}, prompt cursor {state['cursor']})")
        return version

    async def on_step(self, step: int, m: dict) -> None:
        self.samples += m["samples"]
        self.tokens += m["tokens"]
        self.trainer_wait_s += m["wait_s"]
        self.recent.append(m["reward_mean"])
        elapsed = time.perf_counter() - self.started
        m.update(
            step=step, elapsed_s=round(elapsed, 3), samples_per_s=self.samples / elapsed,
            tokens_per_s=self.tokens / elapsed, reward_avg10=sum(self.recent) / len(self.recent),
            trainer_idle_frac=self.trainer_wait_s / elapsed,
            staleness={str(k): v for k, v in m["staleness"].items()},
        )  # fmt: skip
        if time.monotonic() - self._stats_at > 1.0 or step == self.config.trainer.steps:
            self._stats_at = time.monotonic()
            m["workers"] = await self.worker_stats()
        self.view.update(m, self.workers)
        self.run.log(m)
        every = self.config.trainer.checkpoint_every
        if every and step % every == 0:
            await self.checkpoint(step)
        if self.steering is not None:
            await self.steering.between_steps(step, m)  # what clients asked; may wait here, or stop
        if self.interrupted:
            raise StopRun(step, [])

    async def worker_stats(self) -> dict:
        wf = self.wf
        roles = {"rollout": wf.rollouts, "reward": wf.rewards, "reference": wf.references}
        out: dict[str, Any] = {}
        for role, actors in roles.items():
            replies = await asyncio.gather(*(a.stats.remote() for a in actors), return_exceptions=True)
            stats = [s for s in replies if isinstance(s, dict)]
            if not stats:
                continue
            busy = sum(s["busy_s"] for s in stats)
            idle = sum(s["idle_s"] for s in stats)
            out[role] = {
                "idle_frac": idle / max(busy + idle, 1e-9),
                "busy_s": busy,
                "samples": sum(s["samples"] for s in stats),
            }
            if role == "rollout":  # versions loaded while a call was generating (partial rollout)
                out[role]["mid_call_syncs"] = sum(s.get("mid_call_syncs", 0) for s in stats)
        store = (await self.client.store_stats())["partitions"].get(PARTITION, {})
        queues = {name: c["ready"] for name, c in store.get("consumers", {}).items()}
        out["queues"] = queues
        self.workers = {
            **{
                r: f"idle {v['idle_frac']:.0%}  samples {v['samples']}"
                for r, v in out.items()
                if r != "queues"
            },
            "queues (ready rows)": "  ".join(f"{k} {v}" for k, v in queues.items()),
        }
        return out

    async def checkpoint(self, step: int) -> Path:
        """Model, optimizer, version, every row in the store and the prompt cursor, consistently:
        the source is paused (no put in flight) and the trainer is between steps."""
        if self.checkpointed == step:
            return self.run.checkpoint_dir(step)
        cursor = await self.wf.source.call.remote("pause")
        try:
            tmp = self.run.begin_checkpoint(step)  # renamed to step_N once whole (RunDir)
            await self.client.checkpoint(str(tmp / "store"))
            await self.wf.trainer.call.remote("save", str(tmp / "trainer"))
        finally:
            if not (self.steering and self.steering.paused):  # a run a client paused stays paused
                await self.wf.source.call.remote("resume")
        path = self.run.commit_checkpoint(tmp, step, {"step": step, "cursor": cursor})
        self.checkpointed = step
        return path

    def plot(self, before: float | None, after: float | None) -> None:
        """reward.svg: the training reward per step, its 10-step mean, and the held-out evals."""
        metrics = self.run.metrics()
        if not metrics:
            return
        series = {
            "train reward (step mean)": [(m["step"], m["reward_mean"]) for m in metrics],
            "train reward (10-step mean)": [(m["step"], m["reward_avg10"]) for m in metrics],
        }
        if before is not None and after is not None:
            series["held-out eval"] = [(metrics[0]["step"] - 1, before), (metrics[-1]["step"], after)]
        svg = line_chart(
            series, title=f"{self.config.run_name}: {self.config.mode}, k = {self.config.staleness}",
            x_label="step", y_label="reward",
        )  # fmt: skip
        (self.run.path / "reward.svg").write_text(svg)

    def summary(self, before: float | None, after: float | None) -> dict:
        metrics = self.run.metrics()
        first = metrics[: max(1, len(metrics) // 10)]
        last = metrics[-max(1, len(metrics) // 10) :]
        mean = lambda ms, k: sum(m[k] for m in ms) / len(ms)  # noqa: E731
        hist: dict[str, int] = {}
        for m in metrics:
            for k, v in m["staleness"].items():
                hist[k] = hist.get(k, 0) + v
        return {
            "run_dir": str(self.run.path),
            "mode": self.config.mode,
            "staleness_k": self.steering.staleness if self.steering else self.config.staleness,
            "steps": len(metrics),
            "eval_reward_before": before,
            "eval_reward_after": after,
            "reward_first_10pct": mean(first, "reward_mean") if metrics else None,
            "reward_last_10pct": mean(last, "reward_mean") if metrics else None,
            "samples_per_s": metrics[-1]["samples_per_s"] if metrics else None,
            "tokens_per_s": metrics[-1]["tokens_per_s"] if metrics else None,
            "staleness_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
            "seconds": round(time.perf_counter() - self.started, 2),
        }


def train(config: AsyncFlowConfig, *, resume: str | None = None, display: bool = True) -> dict:
    """Run (or resume) RL post-training; returns the summary. Starts Ray here if needed.

    Ctrl-C stops the run at the next step boundary with a checkpoint (a second one at once)."""
    workflow.init_ray(config)  # first: a cluster that refuses us leaves no empty run directory
    run = RunDir.open(resume) if resume else RunDir.create(config)
    view = RunView(config.trainer.steps, config.run_name, enabled=display)
    try:
        return asyncio.run(Run(config, run, view).main(resume=resume is not None))
    except KeyboardInterrupt:
        last = run.latest_checkpoint()
        where = f"from step {last[1]['step']}" if last else "from the start (no checkpoint yet)"
        print(f"\ninterrupted; continue {where} with: asyncflow run --resume {run.path}", file=sys.stderr)
        raise
