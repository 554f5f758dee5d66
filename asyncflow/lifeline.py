"""One sample's life, read from a run's trace: admitted -> generated -> rewarded -> trained.

A sample is `P:S`, sample S of prompt P (the pair the trained ledger records), or `P` for
the whole group. The prompt source's `admit` spans map each admitted prompt's samples to the
store's row ids; every later span that worked on rows names them (`row_ids`), so a sample's
life is the spans on its row, in time order, with the waits between them: how long it sat in
the store before rollout took it, before reward scored it, before the trainer trained it.
Knows nothing about actors; it reads the events (Chrome trace format) it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asyncflow.errors import ConfigError

__all__ = ["Stage", "format_life", "parse_sample", "sample_life"]

STAGES = {"admit": "admitted", "generate": "generated", "reward": "rewarded",
          "reference": "ref logprobs", "step": "trained", "drop_groups": "dropped"}  # fmt: skip


@dataclass
class Stage:
    """One span of a sample's life: what happened, where, when (µs, wall clock) and its args."""

    what: str  # admitted | generated | rewarded | ref logprobs | trained | dropped (dynamic sampling)
    track: str  # the actor: "rollout 0", "trainer rank 0", ...
    start_us: int
    end_us: int
    args: dict[str, Any]


def parse_sample(text: str) -> tuple[int, int | None]:
    """`P:S` -> (P, S); `P` -> (P, None), the group of prompt P."""
    prompt, _, sample = text.partition(":")
    try:
        return int(prompt), (int(sample) if sample else None)
    except ValueError:
        raise ConfigError(
            f"sample {text!r} is not PROMPT:SAMPLE (e.g. 12:3, sample 3 of prompt 12) or PROMPT (its group)"
        ) from None


def sample_life(events: list[dict], prompt: int, sample: int | None = None) -> list[Stage]:
    """The stages of sample `sample` of prompt `prompt` (every sample of it: None), in time order.
    Raises ConfigError naming the prompts the trace holds when it has no such sample."""
    admits = [e for e in events if e.get("name") == "admit" and e.get("ph") == "X"]
    mine = [a for a in admits if a["args"]["prompt"] <= prompt < a["args"]["prompt"] + a["args"]["prompts"]]
    if not mine:
        raise ConfigError(f"no prompt {prompt} in the trace: {_admitted(admits)}")
    admit = max(mine, key=lambda a: a["ts"])  # admitted again after a resume: its last admission
    n, k = admit["args"]["n"], prompt - admit["args"]["prompt"]
    if sample is not None and not 0 <= sample < n:
        raise ConfigError(f"prompt {prompt} has samples 0..{n - 1} (rollout.n = {n}), not {sample}")
    rows = set(admit["args"]["row_ids"][k * n : (k + 1) * n] if sample is None else
               [admit["args"]["row_ids"][k * n + sample]])  # fmt: skip
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    stages = [_stage("admit", admit, names)]
    for e in events:  # a train step may start (waiting for data) before its rows were admitted
        if (
            e.get("ph") == "X"
            and e["name"] in STAGES
            and e["name"] != "admit"
            and e["ts"] + e["dur"] > admit["ts"]
        ):
            if rows.intersection(e["args"].get("row_ids", ())):
                stages.append(_stage(e["name"], e, names, _data_at(events, e)))
    return sorted(stages, key=lambda s: s.start_us)


def _stage(name: str, e: dict, names: dict[int, str], start: int | None = None) -> Stage:
    track = names.get(e["pid"], str(e["pid"]))
    return Stage(STAGES[name], track, e["ts"] if start is None else start, e["ts"] + e["dur"], e["args"])


def _data_at(events: list[dict], step: dict) -> int | None:
    """When a trainer step's batch arrived (the end of its store.get): training starts there."""
    if step["name"] != "step":
        return None
    end = step["ts"] + step["dur"]
    for e in events:
        if e.get("name") == "store.get" and e.get("pid") == step["pid"] and step["ts"] <= e["ts"] <= end:
            return e["ts"] + e["dur"]
    return None


def _admitted(admits: list[dict]) -> str:
    if not admits:
        return "it has no admitted prompt (the run traced none: trace.enabled false, or no step yet)"
    first = min(a["args"]["prompt"] for a in admits)
    last = max(a["args"]["prompt"] + a["args"]["prompts"] - 1 for a in admits)
    n = admits[0]["args"]["n"]
    return f"it holds prompts {first}..{last}, samples 0..{n - 1} of each; pass one of those as P:S"


def format_life(stages: list[Stage], label: str) -> str:
    """The stages as lines: the time since admission, what, where, details, and each wait."""
    t0 = stages[0].start_us
    lines = [f"sample {label}: {len(stages)} stages over {(stages[-1].end_us - t0) / 1e6:.3f} s"]
    previous: Stage | None = None
    for s in stages:
        if previous is not None:
            gap = (s.start_us - previous.end_us) / 1e6
            lines.append(f"{'':>10}  {'waited' if gap >= 0 else 'overlaps'} {abs(gap):.3f} s")
        took = (s.end_us - s.start_us) / 1e6
        lines.append(
            f"{(s.start_us - t0) / 1e6:>+9.3f}s  {s.what:<12}  {s.track:<16}  {_details(s)}, {took:.3f} s"
        )
        previous = s
    return "\n".join(lines)


def _details(s: Stage) -> str:
    a = s.args
    if s.what == "admitted":
        return (
            f"at version {a['version']} (prompts {a['prompt']}..{a['prompt'] + a['prompts'] - 1} in one put)"
        )
    if s.what == "generated":
        v = a.get("version_end", a["version"])
        version = f"version {a['version']}" + (f"->{v}" if v != a["version"] else "")
        return f"at {version} ({a['groups']} groups, {a.get('tokens', '?')} tokens in the call)"
    if s.what == "trained":
        return f"at step {a.get('version', '?')} (version {a['held']} -> {a.get('version', '?')})"
    if s.what == "dropped":
        return f"at version {a['held']}: its group's rewards were all equal (dynamic sampling)"
    return f"{len(a.get('row_ids', ()))} rows in the batch"
