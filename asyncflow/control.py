"""Steering a live run: its named control actor, the run's side of it, and the Python client.

Every run starts one `RunControl` actor named `<store>.control` in the `asyncflow` Ray
namespace, beside the run's other named actors (`<store>.trainer0`, `<store>.rollout0`,
...; `<store>` is `dataplane.name`, the run's name on the cluster). A `Client` in any
process of the cluster (the driver, a notebook, a Ray job, `asyncflow ctl`) finds it by
that name. The actor is only a mailbox and a notice board:

- the run publishes its status and each step's metrics there, so reading them costs the
  run nothing;
- a client's command waits there until the run takes it at the next step boundary
  (between two trainer steps), applies it to the live workers (`Steering`) and replies.

Applying commands only between steps keeps them out of the loop's way and makes their
effect exact: `set_staleness(0)` holds from the next step on, `stop()` checkpoints a
consistent cut (every sample in flight is in it) and `--resume` continues from it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import ray

from asyncflow.errors import ControlError
from asyncflow.workflow import NAMESPACE

VERBS = ("pause", "resume", "set_staleness", "scale_rollout", "scale_reward", "checkpoint", "stop")


def control_name(store: str) -> str:
    return f"{store}.control"


class StopRun(Exception):
    """Raised out of the loop at a step boundary when a client asked the run to stop."""

    def __init__(self, step: int, requests: list[int]):
        super().__init__(f"stop requested at step {step}")
        self.step, self.requests = step, requests


class RunControl:
    """The control actor's body: a mailbox for commands, a board for status and metrics."""

    def __init__(self, state: dict, keep_metrics: int = 10_000):
        self.state = state
        self.lines: deque[dict] = deque(maxlen=keep_metrics)
        self.inbox: list[tuple[int, str, list]] = []
        self.replies: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.news = asyncio.Event()  # set when a command, a metrics line or the end arrives
        self.arrived = asyncio.Event()  # set when a command or the end arrives
        self.ended = False
        self.calls = 0  # client calls in flight (close waits for them)

    # -------------------------------------------------------------- the client's side

    async def request(self, verb: str, args: list) -> dict:
        """Queue a command; wait until the run has applied it and return its reply
        (`{"error": ...}` when it could not)."""
        if self.ended:
            return {"error": f"the run has ended ({self.state.get('state')}); it takes no more commands"}
        self.calls += 1
        try:
            key = next(self.ids)
            self.replies[key] = asyncio.get_running_loop().create_future()
            self.inbox.append((key, verb, args))
            self.arrived.set()
            self._notify()
            return await self.replies[key]
        finally:
            self.calls -= 1

    def status(self) -> dict:
        return dict(self.state)

    async def metrics(self, after_step: int, timeout_s: float) -> tuple[list[dict], bool]:
        """Metrics lines of steps after `after_step` (waiting up to timeout_s for one), and
        whether the run has ended."""
        self.calls += 1
        try:
            deadline = time.monotonic() + timeout_s
            while not self.ended and not self._after(after_step) and time.monotonic() < deadline:
                self.news.clear()
                try:
                    await asyncio.wait_for(self.news.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break
            return self._after(after_step), self.ended
        finally:
            self.calls -= 1

    def _after(self, step: int) -> list[dict]:
        return [m for m in self.lines if m["step"] > step]

    # -------------------------------------------------------------- the run's side

    def publish(
        self, state: dict, line: dict | None = None, take: bool = True
    ) -> list[tuple[int, str, list]]:
        """New status (and a step's metrics line); returns the commands that arrived meanwhile
        (with take=False they stay queued)."""
        self.state = state
        if line is not None:
            self.lines.append(line)
        self._notify()
        if not take:
            return []
        taken, self.inbox = self.inbox, []
        return taken

    async def wait_commands(self, timeout_s: float) -> list[tuple[int, str, list]]:
        """Commands, waiting up to timeout_s for one (or for the end)."""
        if not self.inbox and not self.ended:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout_s)
            except TimeoutError:
                pass
        taken, self.inbox = self.inbox, []
        return taken

    def reply(self, key: int, reply: dict) -> None:
        future = self.replies.pop(key, None)
        if future is not None and not future.done():
            future.set_result(reply)

    async def close(self, state: dict, grace_s: float = 5.0) -> None:
        """The run ended: refuse what is still queued, end metrics streams, let calls return."""
        self.state, self.ended = state, True
        for key, _, _ in self.inbox:
            self.reply(key, {"error": f"the run ended ({state.get('state')}) before it took this command"})
        for key in list(self.replies):
            self.reply(key, {"error": f"the run ended ({state.get('state')})"})
        self.inbox = []
        self.arrived.set()
        self._notify()
        deadline = time.monotonic() + grace_s
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def _notify(self) -> None:
        self.news.set()


class Steering:
    """The run's side of its control actor: after every step it publishes the status and the
    step's metrics, then applies the commands that arrived (between steps, with the trainer
    idle) through the pipeline. While paused it waits here, serving commands, until a
    `resume` or `stop`.

    Commands come to the driver as they arrive (a call that waits on the actor for them), so a
    step boundary costs no round trip: its status goes out without waiting for a reply (each
    publication after the previous one has landed, so they land in order), and the commands
    already here are applied."""

    def __init__(self, pipe: Any, step: int = 0):  # asyncflow.workflow.Pipeline; a resumed run's step
        self.pipe, self.config = pipe, pipe.config
        self.staleness = self.config.staleness
        self.step = step
        name = control_name(self.config.dataplane.name)
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            pass
        else:
            raise ControlError(
                f"a run named {self.config.dataplane.name!r} is already running on this Ray cluster "
                "(its control actor exists); give this run a dataplane.name of its own"
            )
        self.actor: Any = (
            ray.remote(RunControl)
            .options(name=name, namespace=NAMESPACE, num_cpus=0, max_concurrency=1000)
            .remote(self.status("starting"))
        )
        self._inbox: list[tuple[int, str, list]] = []  # commands here, not yet applied
        self._arrived = asyncio.Event()  # set when _inbox gets some
        self._listener: asyncio.Future | None = None
        self._published: Any = None  # the last status publication, until it has landed

    @property
    def paused(self) -> bool:
        return self.pipe.paused

    def status(self, state: str) -> dict:
        return {
            "name": self.config.dataplane.name,
            "state": state,
            "step": self.step,
            "steps": self.config.trainer.steps,
            "mode": self.config.mode,
            "staleness": self.staleness,
            "rollout_workers": len(self.pipe.rollouts),
            "run_dir": str(self.pipe.run.path),
        }

    async def started(self, step: int) -> None:
        self.step = step
        await self.actor.publish.remote(self.status("running"), take=False)
        self._listener = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        """Collect commands as clients send them, until close()."""
        while True:
            commands = await self.actor.wait_commands.remote(60.0)
            if commands:
                self._inbox.extend(commands)
                self._arrived.set()

    async def between_steps(self, step: int, metrics: dict) -> None:
        """Publish `step`, then apply what clients asked for; raises StopRun on `stop`."""
        self.step = step
        line = {k: v for k, v in metrics.items() if k not in ("trained", "workers")}
        await self._landed()
        self._published = self.actor.publish.remote(self.status(self._state()), line, take=False)
        await self._apply(self._take())
        while self.paused:
            await self._arrived.wait()
            await self._apply(self._take())

    async def _landed(self) -> None:
        """Wait for the last publication (long done at a step boundary), so the next lands after it."""
        if self._published is not None:
            await self._published
            self._published = None

    def _take(self) -> list[tuple[int, str, list]]:
        self._arrived.clear()
        taken, self._inbox = self._inbox, []
        return taken

    def _state(self) -> str:
        return "paused" if self.paused else "running"

    async def _apply(self, commands: list[tuple[int, str, list]]) -> None:
        replies, stops = [], [key for key, verb, _ in commands if verb == "stop"]  # stop goes last
        for key, verb, args in commands:
            if verb == "stop":
                continue
            try:
                reply = await getattr(self, verb)(*args) if verb in VERBS else {"error": f"no verb {verb!r}"}
            except ControlError as e:
                reply = {"error": str(e)}
            replies.append((key, reply))
        if commands:  # the status first: a client that has its reply sees the change in status()
            state = "stopping" if stops else self._state()
            await self._landed()
            await self.actor.publish.remote(self.status(state), take=False)
        await self.reply([key for key, _ in replies], [reply for _, reply in replies])
        if stops:
            raise StopRun(self.step, stops)

    async def reply(self, keys: list[int], replies: list[dict]) -> None:
        await asyncio.gather(*(self.actor.reply.remote(k, r) for k, r in zip(keys, replies)))

    async def close(self, state: str) -> None:
        """Tell clients the run ended, let their calls return, then remove the actor."""
        # Best effort: the run's own outcome (its exception, if any) matters more than this.
        if self._listener is not None:
            self._listener.cancel()  # commands it took and nobody applied: close() refuses them
        if self._published is not None:
            await asyncio.gather(self._published, return_exceptions=True)
        await asyncio.gather(self.actor.close.remote(self.status(state)), return_exceptions=True)
        ray.kill(self.actor)

    # -------------------------------------------------------------- the verbs

    async def pause(self) -> dict:
        """Admit no more prompts and take no more trainer steps (rollout finishes what it has)."""
        cursor = await self.pipe.pause()
        return {"step": self.step, "prompt_cursor": cursor}

    async def resume(self) -> dict:
        await self.pipe.resume_admission()
        return {"step": self.step}

    async def set_staleness(self, k: int) -> dict:
        """The new bound holds for every step after this one: admission and the trainer's window."""
        if not isinstance(k, int) or not 0 <= k <= 1024:
            raise ControlError(f"staleness must be an int in 0..1024 (0: on-policy), got {k!r}")
        await self.pipe.set_staleness(k)
        self.staleness = k
        return {"staleness": k, "from_step": self.step + 1}

    async def scale_rollout(self, n: int) -> dict:
        """Add or remove rollout workers. A removed worker's leased rows go back to the store and
        another worker generates them."""
        if not isinstance(n, int) or not 1 <= n <= 1024:
            raise ControlError(f"rollout workers must be an int in 1..1024, got {n!r}")
        return {"rollout_workers": await self.pipe.scale_rollout(n)}

    async def scale_reward(self, n: int) -> dict:
        """Add or remove reward workers, as scale_rollout does rollout workers."""
        if not isinstance(n, int) or not 1 <= n <= 1024:
            raise ControlError(f"reward workers must be an int in 1..1024, got {n!r}")
        return {"reward_workers": await self.pipe.scale_reward(n)}

    async def checkpoint(self) -> dict:
        path = await self.pipe.checkpoint(self.step)
        return {"step": self.step, "checkpoint": str(path)}

    # `stop` is no method: `_apply` raises StopRun and the run checkpoints, then replies.


class Client:
    """Steer a live run from any process of its Ray cluster.

        client = Client("sort")           # the run's dataplane.name
        client.status()                   # step, state, staleness, rollout workers, run dir
        for m in client.metrics(): ...    # every step's metrics as it happens, until the run ends
        client.pause(); client.resume()
        client.set_staleness(0)           # on-policy from the next step on
        client.scale_rollout(2)           # add (or remove) rollout workers
        client.scale_reward(2)            # add (or remove) reward workers
        client.checkpoint()               # a checkpoint now; returns its path
        client.stop()                     # checkpoint and end; `asyncflow run --resume RUN_DIR` continues

    Commands take effect at the run's next step boundary and return once applied. Joins the
    Ray cluster at `address` (or RAY_ADDRESS) unless this process is already connected.
    """

    def __init__(
        self,
        name: str = "asyncflow",
        *,
        address: str | None = None,
        wait_s: float = 0.0,
        timeout_s: float = 600.0,
    ):
        if not ray.is_initialized():
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
        self.name, self.timeout_s = name, timeout_s
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.actor = ray.get_actor(control_name(name), namespace=NAMESPACE)
                return
            except ValueError:
                if time.monotonic() >= deadline:
                    raise ControlError(
                        f"no run named {name!r} is running on this Ray cluster: pass the run's "
                        "dataplane.name, check that it has started (asyncflow ctl waits with --wait), "
                        "and that this process joined the run's cluster (--address / RAY_ADDRESS)"
                    ) from None
                time.sleep(0.2)

    def _get(self, ref: Any) -> Any:
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.RayActorError:
            raise ControlError(f"the run {self.name!r} has ended") from None

    def _request(self, verb: str, *args: Any) -> dict:
        reply = self._get(self.actor.request.remote(verb, list(args)))
        if "error" in reply:
            raise ControlError(f"{verb}: {reply['error']}")
        return reply

    def status(self) -> dict:
        return self._get(self.actor.status.remote())

    def metrics(self, after_step: int = 0, poll_s: float = 10.0) -> Iterator[dict]:
        """Each step's metrics line (steps after `after_step`) as the run logs it; ends with the run."""
        while True:
            try:
                lines, ended = self._get(self.actor.metrics.remote(after_step, poll_s))
            except ControlError:
                return
            yield from lines
            after_step = lines[-1]["step"] if lines else after_step
            if ended and not lines:
                return

    def pause(self) -> dict:
        return self._request("pause")

    def resume(self) -> dict:
        return self._request("resume")

    def set_staleness(self, k: int) -> dict:
        return self._request("set_staleness", k)

    def scale_rollout(self, n: int) -> dict:
        return self._request("scale_rollout", n)

    def scale_reward(self, n: int) -> dict:
        return self._request("scale_reward", n)

    def checkpoint(self) -> dict:
        return self._request("checkpoint")

    def stop(self) -> dict:
        return self._request("stop")
