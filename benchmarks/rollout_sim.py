"""A discrete-event simulator of rollout engines under a scheduling policy, for cluster scale.

It replays the workload of benchmarks/rollout_scheduler.py (groups of episodes; each episode
a few turns of generation separated by tool calls) on simulated engines that run the very
policy the torch engine runs (`services.serving.scheduler.plan_step`), with a step time
fitted to the torch engine's measured steps:

    step_s = a + b * rows + c * kv_tokens + d * prefill_tokens

Each group lives on one engine (its samples are one request); engines share nothing, so a
cluster of E engines is E independent simulations merged on one clock. What it leaves out:
load balancing across engines, weight updates, network and swap bandwidth (a restore costs
nothing beyond the step, as on this CPU, where host and device memory are the same).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.serving.scheduler import Policy, Slot, fcfs_priority, plan_step, priority_key

__all__ = ["Episode", "StepCost", "fit_step_cost", "simulate_engine"]


@dataclass(frozen=True)
class Turn:
    prompt_tokens: int  # tokens added to the context before this turn (the prompt, or the observation)
    new_tokens: int  # tokens the engine generates in this turn
    tool_s: float  # the tool call after this turn (0 after the last)


@dataclass(frozen=True)
class Episode:
    group: int
    index: int
    turns: tuple[Turn, ...]
    start_s: float = 0.0  # when its group arrives


@dataclass(frozen=True)
class StepCost:
    """Seconds of one engine step as a linear function of its work."""

    a: float
    rows: float
    kv_tokens: float
    prefill_tokens: float

    def seconds(self, rows: int, kv_tokens: int, prefill_tokens: int) -> float:
        return max(
            0.0, self.a + self.rows * rows + self.kv_tokens * kv_tokens + self.prefill_tokens * prefill_tokens
        )


def fit_step_cost(log: Sequence[tuple[int, int, int, float]]) -> StepCost:
    """Non-negative least squares over measured steps (rows, KV tokens, prefill tokens, seconds)."""
    if len(log) < 8:
        raise ValueError(f"fit_step_cost: {len(log)} steps logged, need >= 8 to fit 4 coefficients")
    x = np.array([[1.0, r, kv, p] for r, kv, p, _ in log])
    y = np.array([s for *_, s in log])
    from scipy.optimize import nnls

    coef, _ = nnls(x, y)
    return StepCost(*(float(c) for c in coef))


@dataclass(eq=False)
class _Seq:
    episode: Episode
    turn: int
    context: int  # tokens in context (prompt + everything so far), the cache covering all but the last
    arrival: int  # submission order of this turn's request (the engine's FCFS order)
    remaining: int = 0  # the group's unfinished episodes when this turn was submitted (its RL key)
    generated: int = 0  # tokens generated in this turn
    running: bool = False
    cached: bool = False  # has KV (in the batch or kept on the host)


def simulate_engine(
    episodes: Sequence[Episode],
    *,
    policy: Policy,
    cost: StepCost,
    budget_tokens: int,
    max_rows: int,
    keep_kv: bool = True,
    turn_cache: bool = False,
) -> dict:
    """Run one engine to the end; returns group completion times (s) and counters."""
    remaining = {e.group: 0 for e in episodes}
    for e in episodes:
        remaining[e.group] += 1
    # (ready time, tie, seq): episodes not arrived yet, and turns waiting on a tool call
    waiting = [(e.start_s, i, _Seq(e, 0, e.turns[0].prompt_tokens, i)) for i, e in enumerate(episodes)]
    heapq.heapify(waiting)
    live: list[_Seq] = []
    now, done, counters, tie = 0.0, {}, {"steps": 0, "preemptions": 0, "recomputed_tokens": 0}, len(waiting)
    while live or waiting:
        while waiting and waiting[0][0] <= now:
            seq = heapq.heappop(waiting)[2]
            seq.remaining = remaining[seq.episode.group]  # the key is computed when the turn is submitted
            live.append(seq)
        if not live:
            now = waiting[0][0]
            continue
        slots = [Slot(_key(policy, s), s.context, s.running) for s in live]
        plan = plan_step(slots, budget_tokens=budget_tokens, max_rows=max_rows)
        prefill = 0
        for i in plan.preempt:
            live[i].running, live[i].cached = False, keep_kv
            counters["preemptions"] += 1
        for i in plan.admit:
            seq = live[i]
            if not seq.cached:
                # a later turn with the previous turn's KV kept prefills only its new tokens
                reuse = turn_cache and seq.turn and not seq.generated
                fresh = seq.episode.turns[seq.turn].prompt_tokens + 1 if reuse else seq.context
                prefill += fresh - 1
                counters["recomputed_tokens"] += (seq.context - 1) if seq.generated else 0
            seq.running = seq.cached = True
        run = [live[i] for i in plan.run]
        now += cost.seconds(len(run), sum(s.context for s in run), prefill)
        counters["steps"] += 1
        finished = []
        for seq in run:
            seq.context += 1
            seq.generated += 1
            turn = seq.episode.turns[seq.turn]
            if seq.generated >= turn.new_tokens:
                finished.append(seq)
        for seq in finished:
            live.remove(seq)
            episode, nxt = seq.episode, seq.turn + 1
            if nxt < len(episode.turns):  # a tool call, then the next turn as a new request
                tie += 1
                context = seq.context + episode.turns[nxt].prompt_tokens
                ready = now + episode.turns[seq.turn].tool_s
                heapq.heappush(waiting, (ready, tie, _Seq(episode, nxt, context, tie)))
            else:
                remaining[episode.group] -= 1
                if remaining[episode.group] == 0:
                    done[episode.group] = now
    return {"group_done_s": done, **counters, "seconds": now}


def _key(policy: Policy, seq: _Seq) -> tuple[int, ...]:
    """The torch engine's order: FCFS by submission; RL by the caller's key, then submission."""
    if policy == "fcfs":
        return (*fcfs_priority(remaining=1, version=0, arrival=seq.arrival),)
    return (*priority_key(remaining=seq.remaining, version=0, arrival=seq.episode.group), seq.arrival)
