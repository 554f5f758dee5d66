"""Multi-turn episodes: the model and an environment take turns, token in, token out.

An episode's trajectory is what follows the prompt: the ids the engine sampled for each model
turn, then the ids of the environment's observation (its text tokenized once, on its own),
and so on. Nothing is ever decoded and encoded again: decoding happens only to hand a turn's
text to the environment. Beside the ids, a loss mask marks model tokens (1: trained) and
environment tokens (0: not trained, no log-prob), and every model token keeps its behaviour
log-prob and the policy version that sampled it, so a weight update between (or during)
turns shows in the versions of the tokens after it.

Environments live in their own pool (`EnvPool`: EnvHost actors, made remote by the workflow),
so a slow tool waits there while the engine keeps generating the other episodes' turns.
Turns that are ready together go to the engine as one call (`Batcher`). An episode ends when
the environment says done, after `max_turns` model turns, when its tokens reach
`max_episode_tokens`, or past `episode_timeout_s`; `episode["end"]` records which ("env_error"
and `episode["error"]` when the environment itself failed: the sample keeps its turns).

This module knows nothing about the store: the rollout worker writes the trajectories.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from asyncflow.config import import_string
from asyncflow.envs import Environment, Example, Step
from services.serving import Completion, Request

log = logging.getLogger("asyncflow.episodes")
Generate = Callable[[Sequence[Request]], Awaitable[list[Completion]]]


class EnvHost:
    """Environments of many episodes at once, by episode id: one per episode, made by the
    `source` factory with `options`. A plain class; the workflow makes it a Ray actor."""

    def __init__(self, source: str | Callable[..., Any], options: dict[str, Any] | None = None):
        """`source`: the factory, or its 'module:attr' (what crosses to a Ray actor)."""
        self.factory = import_string(source) if isinstance(source, str) else source
        self.source, self.options = getattr(self.factory, "__qualname__", str(source)), dict(options or {})
        self.envs: dict[str, Environment] = {}

    async def reset(self, episode: str, example: dict) -> str:
        env = self.factory(**self.options)
        if not isinstance(env, Environment):
            raise TypeError(
                f"env.source {self.source} made a {type(env).__name__}, which lacks reset/step/close; "
                "return an asyncflow.envs.Environment"
            )
        self.envs[episode] = env
        return await env.reset(Example(**example))

    async def step(self, episode: str, response: str) -> dict:
        return asdict(await self.envs[episode].step(response))

    async def close(self, episode: str) -> None:
        env = self.envs.pop(episode, None)
        if env is not None:
            await env.close()

    def live(self) -> int:
        """Episodes whose environment is open."""
        return len(self.envs)


class RemoteEnvHost:
    """An EnvHost Ray actor behind the same async methods as a local EnvHost."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def reset(self, episode: str, example: dict) -> str:
        return await self.handle.reset.remote(episode, example)

    async def step(self, episode: str, response: str) -> dict:
        return await self.handle.step.remote(episode, response)

    async def close(self, episode: str) -> None:
        await self.handle.close.remote(episode)


class EnvPool:
    """Hosts (local EnvHosts or RemoteEnvHosts) sharing episodes: each episode stays on the host
    that reset it, and episodes are dealt out in turn."""

    def __init__(self, hosts: Sequence[Any]):
        if not hosts:
            raise ValueError("EnvPool needs at least one host; set env.num_workers >= 1")
        self.hosts = list(hosts)
        self._next = itertools.count()
        self._placed: dict[str, Any] = {}

    async def reset(self, episode: str, example: Example) -> str:
        host = self.hosts[next(self._next) % len(self.hosts)]
        self._placed[episode] = host
        return await host.reset(episode, asdict(example))

    async def step(self, episode: str, response: str) -> Step:
        return Step(**await self._placed[episode].step(episode, response))

    async def close(self, episode: str) -> None:
        host = self._placed.pop(episode, None)
        if host is not None:
            await host.close(episode)


class Batcher:
    """`generate(requests)`, with the requests of every caller that asks in the same turn of the
    event loop sent to the engine as one call."""

    def __init__(self, generate: Generate):
        self.generate = generate
        self.pending: list[tuple[list[Request], asyncio.Future]] = []
        self.calls = 0  # engine calls made
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, requests: Sequence[Request]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self.pending.append((list(requests), future))
        if len(self.pending) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.ensure_future(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[list[Request], asyncio.Future]]) -> None:
        self.calls += 1
        try:
            out = await self.generate([r for requests, _ in batch for r in requests])
        except BaseException as e:  # every caller sees the engine's failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        start = 0
        for requests, future in batch:
            count = sum(r.n for r in requests)
            if not future.done():  # (a caller whose episode timed out is gone)
                future.set_result(out[start : start + count])
            start += count


@dataclass
class Trajectory:
    """One episode: the Completion fields the rollout writes, plus the loss mask and the record."""

    request_id: str
    index: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)  # model and environment tokens, in order
    loss_mask: list[int] = field(default_factory=list)  # per response token: 1 model, 0 environment
    logprobs: list[float] = field(default_factory=list)  # per model token
    versions: list[int] = field(default_factory=list)  # per model token
    finish_reason: str = "stop"  # of the last model turn: stop | length | abort
    episode: dict[str, Any] = field(default_factory=dict)  # turns, end, reward parts, info per turn

    def add(self, ids: Sequence[int], trained: bool) -> None:
        self.response_ids += list(ids)
        self.loss_mask += [int(trained)] * len(ids)


class Episodes:
    """Runs episodes against an EnvPool with a tokenizer (see the module's docstring)."""

    def __init__(
        self, pool: EnvPool, tokenizer: Any, stop_ids: Sequence[int], *, max_turns: int,
        episode_timeout_s: float, max_episode_tokens: int,
    ):  # fmt: skip
        self.pool, self.tokenizer, self.stop_ids = pool, tokenizer, tuple(stop_ids)
        self.max_turns, self.timeout_s, self.max_tokens = max_turns, episode_timeout_s, max_episode_tokens
        self._ids = itertools.count()

    def encode(self, text: str) -> list[int]:
        """An observation's ids: its text alone, no special tokens added."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """A model turn's text for the environment, without the token that ended it."""
        ids = list(ids)
        if ids and ids[-1] in (*self.stop_ids, self.tokenizer.eos_token_id):
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def run(self, generate: Generate, request: Request, index: int, example: Example) -> Trajectory:
        """One episode from `request`'s prompt (its params bound every turn) on `example`."""
        out = Trajectory(request.request_id, index, list(request.prompt_ids))
        record: dict[str, Any] = {"turns": 0, "end": "", "reward": {}, "info": [], "seconds": 0.0}
        out.episode, episode, start = (
            record,
            f"{request.request_id}/{index}/{next(self._ids)}",
            time.monotonic(),
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                record["end"] = await self._turns(generate, request, example, episode, out)
        except TimeoutError:
            record["end"] = "timeout"
        except EnvFailed as e:  # the environment's fault: recorded, the episode keeps its turns
            record["end"], record["error"] = "env_error", str(e)
        finally:
            record["seconds"] = round(time.monotonic() - start, 4)
            await asyncio.shield(self._close(episode))  # (also when the episode is cancelled)
        return out

    async def _close(self, episode: str) -> None:
        """Close an episode's environment; a failure to (its actor gone at shutdown) is logged."""
        try:
            await self.pool.close(episode)
        except Exception as e:
            log.warning("the environment of episode %s did not close: %s: %s", episode, type(e).__name__, e)

    async def _turns(
        self, generate: Generate, request: Request, example: Example, episode: str, out: Trajectory
    ) -> str:
        """The turns of one episode; returns why it ended."""
        record = out.episode
        first = await _env(self.pool.reset(episode, example))
        out.add(self.encode(first), trained=False)
        for turns_left in range(self.max_turns - 1, -1, -1):
            room = self.max_tokens - len(out.response_ids)
            if room < 1:
                return "max_episode_tokens"
            params = replace(request.params, max_new_tokens=min(request.params.max_new_tokens, room))
            turn = (
                await generate([Request(request.request_id, out.prompt_ids + out.response_ids, 1, params)])
            )[0]
            out.add(turn.response_ids, trained=True)
            out.logprobs += turn.logprobs
            out.versions += turn.versions
            out.finish_reason, record["turns"] = turn.finish_reason, record["turns"] + 1
            if turn.finish_reason == "abort":
                return "abort"
            step = await _env(self.pool.step(episode, self.decode(turn.response_ids)))
            for name, value in step.reward.items():
                record["reward"][name] = record["reward"].get(name, 0.0) + float(value)
            record["info"].append(step.info)
            if step.done:
                return "done"
            if not turns_left:  # no turn would read the observation
                break
            out.add(self.encode(step.observation), trained=False)
        return "max_turns"


class EnvFailed(Exception):
    """An environment's reset or step raised (or its actor died); the message says what."""


async def _env(call: Awaitable[Any]) -> Any:
    """An environment call, its failure (not the engine's, not a timeout) as EnvFailed."""
    try:
        return await call
    except (TimeoutError, asyncio.CancelledError):
        raise
    except Exception as e:
        raise EnvFailed(f"{type(e).__name__}: {e}") from e
