"""The watchdog: a stage with work waiting and no progress for its deadline is stalled.

Progress is read from what still answers when a worker is stuck: the store's per-consumer
counters (rows acked by rollout, reward and reference, rows waiting for them), the
trainer's step calls (the pipeline marks when each starts and ends), and the store's own
answer to a probe with a timeout. A stage's deadline is `factor` times the longest wait
between its progress measured so far (at least `floor_s`; `first_deadline_s` before any),
or the fixed one the config sets.

On a stall it writes a diagnosis to <run_dir>/stalls/ (the Python stacks of the stage's
actors, read by pid from outside them; the calls and samples in flight; the store's
queues), tells the live view, and applies the stage's policy: restart kills the stuck
actors, Ray restarts them, the pipeline's supervision calls their loop again and the rows
they held are redelivered when their leases end; a stuck trainer is killed and the run
restarts every rank from its last checkpoint (RankDied). stop ends the run with Stalled.
A failure (a dead store, a worker out of restarts) gets the same diagnosis before the run
stops. The watchdog knows nothing about what the stages compute.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from asyncflow.errors import DataPlaneError, RankDied, Stalled
from asyncflow.workflow.hosts import NAMESPACE
from asyncflow.workflow.stacks import stack

log = logging.getLogger("asyncflow")
STAGES = ("trainer", "rollout", "reward", "reference", "store")


@dataclass
class Clock:
    """One stage's progress: the counter seen last, when it last moved (or had nothing to do), and
    the longest wait between moves measured while it had work."""

    last: float
    mark: Any = None
    longest_s: float = 0.0
    starting: bool = False  # restarted, no progress since: a start-up is no measure of a call

    def see(self, mark: Any, now: float, waiting: bool) -> None:
        if mark != self.mark:
            if self.mark is not None and not self.starting:
                self.longest_s = max(self.longest_s, now - self.last)
            self.mark, self.last, self.starting = mark, now, False
        elif not waiting:  # nothing to do is no stall
            self.last = now


@dataclass(eq=False)  # hashable by identity: the pipeline keys its loops by it
class Watchdog:
    """Watches one pipeline (asyncflow.workflow.Pipeline); `run()` is one of its supervised loops."""

    pipe: Any
    on_stall: Callable[[str], None] = lambda text: log.warning("%s", text)
    clocks: dict[str, Clock] = field(default_factory=dict)
    healed: dict[str, int] = field(default_factory=dict)  # actor id -> restarts the watchdog ordered
    restarts: int = 0
    stalled: str | None = None  # why the watchdog killed the trainer: the run restarts with this reason
    failing: bool = False  # a failure is being diagnosed: this pipeline ends with it
    step: int = 0  # trainer steps this pipeline finished
    step_started: float | None = None
    inflight: dict[str, float] = field(default_factory=dict)  # call -> when it started (monotonic)
    queues: dict[str, Any] = field(default_factory=dict)  # the store's consumers, as last read
    written: int = 0
    lives: dict[str, int] = field(default_factory=dict)  # actor id -> Ray's count of its restarts

    @property
    def config(self) -> Any:
        return self.pipe.config.watchdog

    # ------------------------------------------------------------------ what the pipeline tells it

    def step_began(self) -> None:
        self.step_started = self.inflight["the trainer: step"] = time.monotonic()

    def step_ended(self) -> None:
        self.step, self.step_started = self.step + 1, None
        self.inflight.pop("the trainer: step", None)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        now = time.monotonic()
        self.clocks = {stage: Clock(last=now) for stage in STAGES}
        for stage in STAGES[:4]:
            await asyncio.to_thread(self._restarted, stage)  # how many lives each actor has had
        while True:
            await asyncio.sleep(self.config.check_every_s)
            await self.check()

    async def check(self) -> None:
        now = time.monotonic()
        consumers = await self._read_store(now)
        if consumers is not None:
            self.queues = consumers
            for stage in ("rollout", "reward", "reference"):
                c, clock = consumers.get(stage), self.clocks[stage]
                if c is not None and self.actors_of(stage):
                    clock.see(c["acked"], now, c["ready"] + c["leased"] > 0)
                else:  # no such stage in this run
                    clock.see(clock.mark, now, False)
            trainer = consumers.get("trainer", {})
            has_batch = trainer.get("ready", 0) + trainer.get("leased", 0) >= self._batch_rows()
            self.clocks["trainer"].see(self.step, now, self.step_started is not None and has_batch)
        for stage in STAGES if consumers is not None else ("store",):  # a silent store: blame only it
            clock, deadline = self.clocks[stage], self.deadline(stage)
            if now - clock.last > deadline:
                if stage != "store" and await asyncio.to_thread(self._restarted, stage):
                    clock.last, clock.starting = now, True  # Ray restarted one: a start-up, no stall
                    continue
                await self.stall(stage, now - clock.last, deadline)
                clock.last, clock.starting = time.monotonic(), True  # restarted: first_deadline_s again

    def deadline(self, stage: str) -> float:
        c, clock = self.config, self.clocks[stage]
        if stage in c.deadline_s:
            return c.deadline_s[stage]
        if stage == "store":  # the store answers each probe, or is stuck
            return max(c.floor_s, c.probe_timeout_s)
        if clock.starting or clock.longest_s == 0:
            return c.first_deadline_s
        return max(c.floor_s, c.factor * clock.longest_s)

    def actors_of(self, stage: str) -> list[Any]:
        p = self.pipe
        if stage != "store":
            return {
                "trainer": p.trainers,
                "rollout": p.rollouts,
                "reward": p.rewards,
                "reference": p.references,
            }[stage]
        d = p.config.dataplane  # the memory store's actors (a Redis store's server is not ours to read)
        names = (
            ["controller", *(f"unit{i}" for i in range(d.num_storage_units))] if d.backend == "memory" else []
        )
        found = []
        for name in names:
            try:
                found.append(ray.get_actor(f"{d.name}.{name}", namespace=NAMESPACE))
            except ValueError:  # it died: nothing to read
                pass
        return found

    def _restarted(self, stage: str) -> bool:
        """Whether one of the stage's actors is restarting, or restarted since the last look."""
        from ray._private import state

        changed = False
        for actor in self.actors_of(stage):
            key = actor._actor_id.hex()
            info = state.actors(key)
            lives = int(info.get("NumRestarts", 0))
            changed |= info.get("State") not in ("ALIVE", None) or lives != self.lives.get(key, lives)
            self.lives[key] = lives
        return changed

    def _batch_rows(self) -> int:
        c = self.pipe.config
        return c.trainer.batch_prompts * c.rollout.n

    async def _read_store(self, now: float) -> dict | None:
        """The samples partition's consumers; None when the store did not answer in time. A store
        that fails (a storage unit died, Redis is gone) stops the run here, diagnosed."""
        from workers.samples import PARTITION

        try:
            stats = await asyncio.wait_for(self.pipe.client.store_stats(), self.config.probe_timeout_s)
        except TimeoutError:
            return None
        except DataPlaneError as e:
            await self.failed(e)
            raise
        self.clocks["store"].see(now, now, False)
        return stats["partitions"].get(PARTITION, {}).get("consumers", {})

    # ------------------------------------------------------------------ a stall

    async def stall(self, stage: str, since_s: float, deadline_s: float) -> None:
        """Diagnose `stage`, then restart its stuck actors or stop the run (Stalled)."""
        actors = await self._stuck(stage)
        policy = self.config.policy_of(stage)
        if policy == "restart" and stage != "trainer" and self.restarts >= self.config.max_restarts:
            policy = f"stop (its restarts are spent: watchdog.max_restarts = {self.config.max_restarts})"
        reason = f"no progress for {since_s:.0f} s (deadline {deadline_s:.0f} s)"
        path = await self.diagnose(stage, reason, actors, policy)
        text = f"stall: {stage} made {reason}; {policy}; diagnosis in {path}"
        self.on_stall(text)
        if not policy.startswith("restart"):
            error = Stalled(
                f"the {stage} stage stalled: {reason}, and watchdog.policy.{stage} is {policy}; the "
                f"diagnosis (stacks, calls and samples in flight, queues) is in {path}"
            )
            error.diagnosed = True  # type: ignore[attr-defined]
            raise error
        if stage == "trainer":  # the step fails, RankDied: the run restarts from its last checkpoint
            self.stalled = f"the trainer stalled ({reason}; diagnosis in {path})"
            for rank in self.pipe.trainers:
                ray.kill(rank)
            return
        self.restarts += 1
        for _, actor in actors:
            key = actor._actor_id.hex()
            self.healed[key] = self.healed.get(key, 0) + 1  # the supervision expects this death
            ray.kill(actor, no_restart=False)

    async def _stuck(self, stage: str) -> list[tuple[str, Any]]:
        """The stage's actors that do not answer a probe; all of them if every one answers (stuck
        in a loop that still lets the actor answer)."""
        actors = [(self._name(a), a) for a in self.actors_of(stage)]
        if stage in ("store", "trainer"):
            return actors
        replies = await asyncio.gather(
            *(asyncio.wait_for(a.stats.remote(), self.config.probe_timeout_s) for _, a in actors),
            return_exceptions=True,
        )
        silent = [pair for pair, reply in zip(actors, replies) if not isinstance(reply, dict)]
        return silent or actors

    def _name(self, actor: Any) -> str:
        role = self.pipe.role_of(actor._actor_id.hex())
        return role if role != "a worker" else _ray_name(actor)

    async def failed(self, error: Exception) -> None:
        """A failure ends the run: the same diagnosis, naming the stage the error names."""
        if self.stalled is not None or self.failing or getattr(error, "diagnosed", False):
            return  # (a dead store fails the health read and the step at once: one diagnosis)
        self.failing = True
        stage = _stage_of(error)
        actors = [(self._name(a), a) for a in self.actors_of(stage)] if stage else []
        try:
            again = "restart the run from its last checkpoint (while trainer.max_restarts allow)"
            action = again if isinstance(error, RankDied) else "stop (failed)"
            path = await self.diagnose(stage or "unknown", str(error), actors, action)
        except Exception as e:  # the diagnosis must not hide the failure it describes
            log.warning("could not write the diagnosis of %s: %s", error, e)
            return
        error.diagnosed = True  # type: ignore[attr-defined]
        self.on_stall(f"{stage or 'the run'} failed; diagnosis in {path}")

    # ------------------------------------------------------------------ the diagnosis

    async def diagnose(self, stage: str, reason: str, actors: list[tuple[str, Any]], action: str):
        """Write stalls/<n>-<stage>.json (for programs) and .txt (to read): what stalled, why, the
        stacks of its actors, the calls and samples in flight and the store's queues."""
        now = time.monotonic()
        found = await asyncio.gather(*(asyncio.to_thread(_stack_of, a) for _, a in actors))
        capture_s = time.monotonic() - now
        doing = await asyncio.gather(*(self._in_flight(a) for _, a in actors))
        record = {
            "stage": stage,
            "reason": reason,
            "action": action,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "trainer_steps": self.step,
            "stacks_read_in_s": round(capture_s, 2),
            "deadlines_s": {s: self.deadline(s) for s in self.clocks},
            "since_progress_s": {s: round(now - c.last, 1) for s, c in self.clocks.items()},
            "actors": [
                {"name": n, "pid": pid, "stack": st, "in_flight": spans}
                for (n, _), (pid, st), spans in zip(actors, found, doing)
            ],
            "calls_in_flight": {call: round(now - t, 1) for call, t in self.inflight.items()},
            "loops_running": [
                a if isinstance(a, str) else self._name(a)  # a string: a driver loop (health, a resize)
                for a, task in self.pipe.loops.items()
                if a is not self and not task.done()
            ],
            "samples_in_flight": {c: q.get("leased", 0) for c, q in self.queues.items()},
            "queues": self.queues,
        }
        self.written += 1
        folder = self.pipe.run.path / "stalls"
        folder.mkdir(exist_ok=True)
        path = folder / f"{int(time.time())}-{self.written:03d}-{stage}"
        path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        path.with_suffix(".txt").write_text(_readable(record))
        return path.with_suffix(".txt")

    async def _in_flight(self, actor: Any) -> dict:
        """What the actor is doing: its open spans (names, seconds, row ids) as it tells them now,
        or, when it does not answer (its event loop is stuck), as the last trace collection saw them."""
        last = {"as_of": "last trace collection", "spans": self.pipe.traces.in_flight.get(actor, [])}
        if self.stalled is not None or not hasattr(actor, "in_flight"):  # a store actor has no spans
            return last
        try:
            spans = await asyncio.wait_for(actor.in_flight.remote(), self.config.probe_timeout_s)
            return {"as_of": "now", "spans": spans}
        except (TimeoutError, ray.exceptions.RayError):  # frozen, dead, or blocked: the last collection's
            return last


def _stack_of(actor: Any) -> tuple[int | None, str]:
    """An actor's pid, from Ray's control store (a stuck actor cannot say it), and its stacks."""
    from ray._private import state

    try:
        pid = int(state.actors(actor._actor_id.hex())["Pid"])
    except (KeyError, TypeError, ValueError) as e:  # no such actor in Ray's table, or no pid yet: said
        return None, f"no stack: Ray does not know the actor's process ({e})"
    return pid, stack(pid)


def _ray_name(actor: Any) -> str:
    from ray._private import state

    try:
        return str(state.actors(actor._actor_id.hex())["Name"])
    except (KeyError, TypeError):  # Ray's table has no such actor (any more): its id names it
        return actor._actor_id.hex()


def _stage_of(error: Exception) -> str | None:
    if isinstance(error, DataPlaneError):
        return "store"
    text = str(error)
    for stage in ("trainer", "rollout", "reward", "reference"):
        if stage in text:
            return stage
    return None


def _readable(record: dict) -> str:
    lines = [
        f"{record['time']}  stage: {record['stage']}  action: {record['action']}",
        f"reason: {record['reason']}",
        f"trainer steps done: {record['trainer_steps']}",
        "seconds since progress: " + ", ".join(f"{s} {v}" for s, v in record["since_progress_s"].items()),
        "calls in flight (seconds): " + json.dumps(record["calls_in_flight"]),
        "streaming loops running: " + ", ".join(record["loops_running"]),
        "samples in flight (rows leased, by consumer): " + json.dumps(record["samples_in_flight"]),
        "queues: " + json.dumps(record["queues"]),
    ]
    for actor in record["actors"]:
        lines += ["", f"--- {actor['name']} (pid {actor['pid']})"]
        doing = actor.get("in_flight", {})
        for span in doing.get("spans", []):
            args = {k: v for k, v in span.items() if k not in ("name", "for_s")}
            lines.append(
                f"in flight ({doing['as_of']}): {span['name']} for {span['for_s']} s  {json.dumps(args)}"
            )
        lines.append(actor["stack"].rstrip())
    return "\n".join(lines) + "\n"
