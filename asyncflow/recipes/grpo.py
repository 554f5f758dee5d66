"""GRPO, asynchronous or synchronous: the loops that drive a run, each on one screen.

async: rollout, reward (and reference) workers stream on their own; the source admits
prompts within the staleness bound; this loop only asks the trainer for steps.
sync:  the same workers, strictly alternating generate -> reward -> train -> sync.

The pipeline (asyncflow.workflow) owns the actors; `Run` takes a run from its start (fresh
or resumed) through the loop to its summary, with checkpoints, steering and Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time

from asyncflow.config import AsyncFlowConfig
from asyncflow.control import Steering, StopRun
from asyncflow.display import RunView
from asyncflow.errors import DataPlaneError, RankDied, RunStopped, WorkerError
from asyncflow.report import Report, prompts_line
from asyncflow.rundir import RunDir
from asyncflow.workflow import Pipeline, init_ray


async def run_async(pipe: Pipeline, start: int, steps: int, on_step) -> None:
    await pipe.start_streams()
    try:
        for step in range(start + 1, steps + 1):
            await on_step(step, await pipe.train_step())
    finally:
        await pipe.stop_streams()


async def run_sync(pipe: Pipeline, start: int, steps: int, on_step) -> None:
    for step in range(start + 1, steps + 1):
        await pipe.sync_round(step)  # admit a batch, generate it, score it
        metrics = await pipe.train_step()
        await pipe.sync_weights(step)
        await on_step(step, metrics)


class Run:
    """One run: start (warm-start or resume), the loop, checkpoints, the summary."""

    def __init__(self, config: AsyncFlowConfig, run: RunDir, view: RunView):
        self.config, self.run, self.view = config, run, view
        self.report = Report(config, run)
        self.steering: Steering | None = None  # applies what clients ask (asyncflow.control)
        self.checkpointed = -1  # step of the last checkpoint taken
        self.interrupted: str | None = None  # "ctrl-c" or "sigterm": stop at the next step, checkpointed
        self.stopped_with_checkpoint = False  # past it, shutting down: SIGTERM's deadline no longer cuts
        self.grace_expired = False  # SIGTERM, and no step boundary within sigterm_grace_s
        self._stats_at = 0.0

    async def main(self, resume: bool) -> dict:
        restarts = 0
        while True:
            try:
                return await self._main(resume)
            except RankDied as e:  # every rank again, with every other worker, from the last checkpoint
                if restarts >= self.config.trainer.max_restarts:
                    raise RankDied(f"{e}; {self.resume_hint()}") from None
                restarts += 1
                self.report.restarts = restarts
                self.view.note(
                    f"{e}: restarting the run from its last checkpoint "
                    f"({restarts} of trainer.max_restarts = {self.config.trainer.max_restarts})"
                )
                resume = True
            except (DataPlaneError, WorkerError) as e:  # what failed, and how to go on
                raise type(e)(f"{e}; {self.resume_hint()}") from None

    def resume_hint(self) -> str:
        last = self.run.latest_checkpoint()
        where = f"its last checkpoint is step {last[1]['step']}" if last else "it has no checkpoint yet"
        return f"the run stopped ({where}): continue it with `asyncflow run --resume {self.run.path}`"

    def _on_ctrl_c(self) -> None:
        self.interrupted = "ctrl-c"
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)  # a second Ctrl-C stops at once
        self.view.note("Ctrl-C: stopping after this step with a checkpoint (press it again to stop now)")

    def _on_sigterm(self, task: asyncio.Task | None) -> None:
        """Job stop, eviction, node drain: a checkpoint at the next step boundary, or, once
        sigterm_grace_s has passed, the run ends without one (Ray or Kubernetes kills it next)."""
        loop = asyncio.get_running_loop()
        loop.remove_signal_handler(signal.SIGTERM)
        grace = self.config.sigterm_grace_s
        self.interrupted = self.interrupted or "sigterm"
        self.view.note(f"SIGTERM: stopping after this step with a checkpoint (within {grace:g} s)")
        loop.call_later(grace, self._past_grace, task)

    def _past_grace(self, task: asyncio.Task | None) -> None:
        if task is not None and not task.done() and not self.stopped_with_checkpoint:
            self.view.note(
                f"SIGTERM: no checkpoint within sigterm_grace_s = {self.config.sigterm_grace_s:g} s"
            )
            self.grace_expired = True
            task.cancel()

    async def _main(self, resume: bool) -> dict:
        config, run = self.config, self.run
        with contextlib.suppress(ValueError, NotImplementedError, RuntimeError):  # main thread only
            events = asyncio.get_running_loop()
            events.add_signal_handler(signal.SIGINT, self._on_ctrl_c)
            events.add_signal_handler(signal.SIGTERM, self._on_sigterm, asyncio.current_task())
        state = run.latest_checkpoint(on_skip=self.view.note) if resume else None
        if resume and state is None:
            self.view.note(f"{run.path}: no usable checkpoint; starting again from step 0")
            run.truncate_logs(0)
        where = state[1] if state else {}  # the prompt cursor, and the slots dropped groups freed
        self.pipe = pipe = Pipeline(config, run, cursor=where.get("cursor", 0), freed=where.get("freed", 0))
        pipe.watchdog.on_stall = self.view.stall  # a stall's line in the live view
        if pipe.prompt_filter:
            self.view.note(prompts_line(pipe.prompt_filter))
        ended = "failed"
        try:
            self.steering = Steering(pipe, step=state[1]["step"] if state else 0)
            await pipe.ready()
            if state is None:
                self.view.note(f"warm-start: {await pipe.fresh()}")
                start = 0
            else:
                path, saved = state
                start = await pipe.resume(path)
                run.truncate_logs(saved["step"])
                self.view.note(f"resumed from {path} (step {saved['step']}, prompt cursor {saved['cursor']})")
            evals = config.task.eval_prompts
            before = await pipe.evaluate(evals, start) if evals else None
            self.view.note(f"{run.path}: step {start}/{config.trainer.steps}, eval reward before {before}")
            self.report.started = time.perf_counter()
            await self.steering.started(start)
            loop = run_async if config.mode == "async" else run_sync
            try:
                with self.view:
                    await loop(pipe, start, config.trainer.steps, self.on_step)
            except StopRun as stop:  # a client or Ctrl-C asked: checkpoint here and end; --resume continues
                path = await self.checkpoint(stop.step)
                self.stopped_with_checkpoint = True
                reply = {"step": stop.step, "checkpoint": str(path)}
                await self.steering.reply(stop.requests, [reply] * len(stop.requests))
                ended = "stopped"
                by = self.interrupted or "client"
                return await self.finish(before, None, stopped_at_step=stop.step, stopped_by=by)
            after = await pipe.evaluate(evals, config.trainer.steps) if evals else None
            await self.checkpoint(config.trainer.steps)
            ended = "finished"
            return await self.finish(before, after)
        except (DataPlaneError, WorkerError) as e:  # wherever it surfaced (a step, a checkpoint): diagnosed
            await pipe.watchdog.failed(e)
            raise
        finally:
            if self.steering is not None:
                await self.steering.close(ended)
            await pipe.shutdown()

    async def on_step(self, step: int, m: dict) -> None:
        workers = None
        if time.monotonic() - self._stats_at > 1.0 or step == self.config.trainer.steps:
            self._stats_at = time.monotonic()
            workers = await self.pipe.worker_stats()
        m = self.report.step(step, m, workers)
        self.view.update(m, self.report.workers)
        resized = await self.pipe.autoscaler.after_step(m, workers)  # rollout/reward.autoscale
        if resized:
            self.view.note("autoscale: " + ", ".join(f"{role} workers -> {n}" for role, n in resized.items()))
        every = self.config.trainer.checkpoint_every
        if every and step % every == 0:
            await self.checkpoint(step)
        if self.steering is not None:
            await self.steering.between_steps(step, m)  # what clients asked; may wait here, or stop
        if self.interrupted:
            raise StopRun(step, [])

    async def checkpoint(self, step: int):
        if self.checkpointed != step:
            await self.pipe.checkpoint(step)
            self.checkpointed = step
        return self.run.checkpoint_dir(step)

    async def finish(self, before: float | None, after: float | None, **more) -> dict:
        """The summary (with what is left untrained: kept in the final checkpoint) and the plot."""
        left = await self.pipe.finish()
        staleness = self.steering.staleness if self.steering else self.config.staleness
        return self.report.summary(before, after, staleness, **left, **self.pipe.prompt_filter, **more)


def train(
    config: AsyncFlowConfig,
    *,
    resume: str | None = None,
    resume_if_exists: bool = False,
    display: bool = True,
) -> dict:
    """Run (or resume) RL post-training; returns the summary. Starts Ray here if needed.

    resume: the run directory to continue; resume_if_exists: continue the run's stable run
    directory (run_dir_mode: stable) from its last checkpoint if an earlier attempt made it.
    Ctrl-C stops the run at the next step boundary with a checkpoint (a second one at once);
    SIGTERM does the same within sigterm_grace_s, then ends without one (RunStopped)."""
    init_ray(config)  # first: a cluster that refuses us leaves no empty run directory
    if resume:
        run, again = RunDir.open(resume), True
    elif resume_if_exists:
        run, again = RunDir.for_config(config)
    else:
        run, again = RunDir.create(config), False
    view = RunView(config.trainer.steps, config.run_name, enabled=display)
    if again and not resume:
        done = run.summary()
        if done and "stopped_at_step" not in done and done["steps"] >= config.trainer.steps:
            view.note(f"{run.path}: this run has finished ({done['steps']} steps); nothing to do")
            return done  # a job applied again after it succeeded
        view.note(f"{run.path}: an earlier attempt of this run; continuing it")
    runner = Run(config, run, view)
    try:
        return asyncio.run(runner.main(resume=again))
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; continue {_where(run)} with: asyncflow run --resume {run.path}", file=sys.stderr
        )
        raise
    except asyncio.CancelledError:
        if not runner.grace_expired:
            raise
        raise RunStopped(
            f"stopped by SIGTERM without a final checkpoint (none within sigterm_grace_s = "
            f"{config.sigterm_grace_s:g} s); continue {_where(run)} with: asyncflow run --resume {run.path}"
        ) from None
    finally:
        runner.report.close()


def _where(run: RunDir) -> str:
    last = run.latest_checkpoint()
    return f"from step {last[1]['step']}" if last else "from the start (no checkpoint yet)"
