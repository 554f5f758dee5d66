"""Action Flow Matching as continual learning through the store: robot actors and a flow trainer.

`AFMActor` steps a batch of point robots (asyncflow.tasks.robot) with a CEM planner under the
nominal model, refines each planned action a0 with the flow (services.flow.afm.refine),
executes it, and writes every transition as a hindsight pair (a0 = nominal inverse of the
move, a* = the executed action, the position and the previous step's transition error) into
the store, stamped with the weight version it acted with. Between two env steps (its safe
point) it pulls the newest published weights.

`AFMTrainer` reads the transitions as one consumer, so the store hands each row to it once;
it asks only for rows within the staleness bound (`v_min`; older ones are dropped, counted by
the store) and checks the bound again on what it gets (asyncflow.versioning). Each batch is
one Adam step on the AFM loss, after which it publishes version v + 1. It keeps the row
indices it trained on, so a run can show that each transition was trained once.

Plain classes: the workflow (asyncflow.workflow.afm) makes them Ray actors.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from asyncflow.config import AFMConfig, FlowConfig
from asyncflow.tasks.robot import PointRobotEnv, nominal_step
from asyncflow.versioning import is_usable, min_usable_version
from dataplane import StoreClient
from services.flow.afm import CEMPlanner, afm_loss, condition, refine, relabel
from services.flow.model import VelocityMLP
from workers.weights import WeightClient

__all__ = ["CONSUMER", "SCHEMA", "AFMActor", "AFMTrainer", "Episode", "afm_model"]

SCHEMA = {
    "position": "float32[2]", "a0": "float32[2]", "intended": "float32[2]", "error": "float32[2]",
    "actor": "int64", "step": "int64",
}  # fmt: skip
CONSUMER = "afm-trainer"


def afm_model(flow: FlowConfig, seed: int) -> VelocityMLP:
    """The refiner: a velocity MLP over actions (2) conditioned on [position, a0, error] (6), its
    output layer zeroed so that version 0 returns a0 unchanged (the planner alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = VelocityMLP(
            2, 6, hidden_size=flow.hidden_size, num_layers=flow.num_layers, time_features=flow.time_features
        )
    last = model.net[-1]
    assert isinstance(last, torch.nn.Linear)
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return model


@dataclass
class Episode:
    """One finished episode, as the actor saw it."""

    actor: int
    seed: int
    start_s: float  # seconds since the run's start
    end_s: float
    steps: int
    success: bool
    version: int  # the weights it ended with


class AFMActor:
    def __init__(
        self, config: AFMConfig, flow: FlowConfig, store_address: str, weights: Any, partition: str, *,
        actor: int, seed: int, remote: bool = True,
    ):  # fmt: skip
        torch.set_num_threads(1)
        self.config, self.partition, self.actor, self.seed = config, partition, actor, seed
        self.store_address, self.weights = store_address, WeightClient(weights, remote=remote)
        self.model, self.version = afm_model(flow, seed), -1
        c = config
        self.envs = [
            PointRobotEnv(gain=c.gain, angle=c.angle, wind=c.wind, max_steps=c.max_steps)
            for _ in range(c.robots)
        ]
        self.dt = self.envs[0].dt
        self.planner = CEMPlanner(
            self.dt, horizon=c.horizon, population=c.population, elites=c.elites, iterations=c.iterations,
            seed=seed * 7919 + actor,
        )  # fmt: skip
        self.rng = np.random.default_rng([seed, actor])
        self.episodes: list[Episode] = []
        self.versions_used: list[int] = []  # the version of every put

    async def sync(self) -> None:
        """The safe point: take the newest published weights, if newer than ours."""
        if await self.weights.latest() > self.version:
            self.version, tensors = await self.weights.pull(max(self.version, 0), whole=True)
            self.model.load_state_dict(tensors, strict=True)

    def _reset(self, i: int, count: int, started: float) -> None:
        seed = (self.seed * 1_000_003 + self.actor) * 100_003 + count
        self.envs[i].reset(seed=seed)
        self._episode[i] = (seed, time.perf_counter() - started)

    def _act(
        self, position: np.ndarray, goal: np.ndarray, error: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(planned a0, executed action), each (N, 2)."""
        a0 = self.planner.plan(position, goal)
        action = a0
        if self.config.refine:
            cond = condition(*(torch.as_tensor(a, dtype=torch.float32) for a in (position, a0, error)))
            active = torch.as_tensor(np.linalg.norm(error, axis=1) >= self.config.threshold)
            a0_t = torch.as_tensor(a0, dtype=torch.float32)
            action = refine(self.model, a0_t, cond, self.config.refine_steps, active).double().numpy()
        noise = self.config.explore * self.rng.standard_normal(action.shape)
        return a0, np.clip(action + noise, -1.0, 1.0)

    async def run(self, duration_s: float) -> dict:
        """Act for `duration_s` seconds; returns the episodes and the versions of every put."""
        store = await StoreClient.connect(self.store_address)
        started, n = time.perf_counter(), len(self.envs)
        self._episode: dict[int, tuple[int, float]] = {}
        for i in range(n):
            self._reset(i, i, started)
        count, error, steps = n, np.zeros((n, 2)), np.zeros(n, int)
        rows: list[tuple[Any, ...]] = []  # (position, a0, intended, error) of one env step, each (N, 2)
        try:
            while time.perf_counter() - started < duration_s:
                if rows and await self.weights.latest() > self.version:
                    await self._put(store, rows)  # rows carry the version they were made with
                    rows = []
                await self.sync()
                position = np.stack([e.position for e in self.envs])
                a0, executed = self._act(position, np.stack([e.goal for e in self.envs]), error)
                done = np.zeros(n, bool)
                for i, env in enumerate(self.envs):
                    _, _, terminated, truncated, _ = env.step(executed[i])
                    done[i], steps[i] = terminated or truncated, steps[i] + 1
                    if done[i]:
                        seed, start_s = self._episode[i]
                        end_s = time.perf_counter() - started
                        self.episodes.append(
                            Episode(self.actor, seed, start_s, end_s, int(steps[i]), terminated, self.version)
                        )
                next_position = np.stack([e.position for e in self.envs])
                hindsight_a0, intended = relabel(position, next_position, executed, self.dt)
                rows.append((position, hindsight_a0, intended, error))
                error = nominal_step(position, a0, self.dt) - next_position
                for i in np.flatnonzero(done):
                    self._reset(int(i), count, started)
                    count, error[i], steps[i] = count + 1, 0.0, 0
                if len(rows) >= self.config.put_every:
                    await self._put(store, rows)
                    rows = []
            if rows:
                await self._put(store, rows)
        finally:
            await store.close()
        return {"episodes": [asdict(e) for e in self.episodes], "put_versions": self.versions_used}

    async def _put(self, store: Any, rows: list[tuple[Any, ...]]) -> None:
        fields = [np.concatenate([r[k] for r in rows]).astype(np.float32) for k in range(4)]
        count = len(fields[0])
        first = len(self.versions_used)
        data = dict(zip(("position", "a0", "intended", "error"), fields))
        data |= {"actor": np.full(count, self.actor), "step": np.arange(first, first + count)}
        await store.put(self.partition, data, version=max(self.version, 0))
        self.versions_used += [max(self.version, 0)] * count


class AFMTrainer:
    def __init__(
        self, config: AFMConfig, flow: FlowConfig, store_address: str, weights: Any, partition: str, *,
        staleness: int, seed: int, remote: bool = True,
    ):  # fmt: skip
        torch.set_num_threads(1)
        self.config, self.partition, self.staleness = config, partition, staleness
        self.store_address, self.weights = store_address, WeightClient(weights, remote=remote)
        self.model = afm_model(flow, seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.version = 0
        self.trained: list[int] = []  # store row indices, in the order they were trained on
        self.lags: list[int] = []  # trainer version - row version, per trained row
        self.losses: list[float] = []

    async def start(self) -> int:
        """Publish version 0 (the identity refiner), so actors start from the same weights."""
        await self.weights.publish(0, self._tensors())
        return 0

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def step(self, data: dict[str, Any]) -> float:
        """One Adam step on a batch of transitions."""
        t = {
            k: torch.as_tensor(np.asarray(data[k]), dtype=torch.float32)
            for k in ("position", "a0", "intended", "error")
        }
        cond = condition(t["position"], t["a0"], t["error"])
        loss = afm_loss(self.model, t["a0"], t["intended"], cond, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    async def run(self) -> dict:
        """Train on every usable transition once, until the partition is sealed and drained."""
        store = await StoreClient.connect(self.store_address)
        fields, previous = list(SCHEMA), None
        try:
            while True:
                batch = await store.get(
                    self.partition, fields, self.config.batch_size, CONSUMER, ack=previous,
                    v_min=min_usable_version(self.version, self.staleness),
                )  # fmt: skip
                previous = batch if len(batch) else None
                if len(batch):
                    self._train(batch)
                    await self.weights.publish(self.version, self._tensors())
                if batch.end:
                    break
            if previous is not None:
                await store.ack(previous)
            stats = (await store.store_stats()).get("partitions", {}).get(self.partition, {})
        finally:
            await store.close()
        return {
            "version": self.version, "trained": self.trained, "lags": self.lags, "losses": self.losses,
            "store": stats.get("consumers", {}).get(CONSUMER, {}),
        }  # fmt: skip

    def _train(self, batch: Any) -> None:
        stale = [v for v in batch.versions if not is_usable(self.version, v, self.staleness)]
        if stale:
            raise RuntimeError(
                f"the store served rows of versions {sorted(set(stale))} to the trainer at version "
                f"{self.version} with staleness bound {self.staleness}; v_min should have dropped them"
            )
        self.losses.append(self.step(batch.data))
        self.trained += list(batch.rows)
        self.lags += [self.version - v for v in batch.versions]
        self.version += 1
