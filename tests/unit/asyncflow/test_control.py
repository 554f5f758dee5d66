"""The control actor's body without Ray: a mailbox for commands, a board for status and metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from asyncflow.control import RunControl

ROOT = Path(__file__).resolve().parents[3]


async def test_a_command_waits_until_the_run_applies_it():
    board = RunControl({"state": "starting"})
    ask = asyncio.ensure_future(board.request("set_staleness", [0]))
    await asyncio.sleep(0)
    assert board.publish({"state": "running", "step": 1}, take=False) == []  # a status update takes nothing
    ((key, verb, args),) = board.publish({"state": "running", "step": 1}, {"step": 1, "reward_mean": 0.5})
    assert (verb, args) == ("set_staleness", [0]) and not ask.done()
    board.reply(key, {"staleness": 0, "from_step": 2})
    assert await ask == {"staleness": 0, "from_step": 2}
    assert board.status() == {"state": "running", "step": 1}


async def test_metrics_wait_for_new_steps_and_end_with_the_run():
    board = RunControl({"state": "running"})
    board.publish({"state": "running"}, {"step": 1})
    assert await board.metrics(0, 0.01) == ([{"step": 1}], False)
    assert await board.metrics(1, 0.01) == ([], False)  # nothing new within the timeout
    waiting = asyncio.ensure_future(board.metrics(1, 30))
    await asyncio.sleep(0)
    board.publish({"state": "running"}, {"step": 2}, take=False)
    assert await waiting == ([{"step": 2}], False)
    await board.close({"state": "finished"})
    assert await board.metrics(2, 30) == ([], True)


async def test_the_driver_waits_for_commands_not_for_metrics_lines():
    """What the driver's waiting call returns on: a command or the end, never its own status."""
    board = RunControl({"state": "running"})
    waiting = asyncio.ensure_future(board.wait_commands(30))
    await asyncio.sleep(0)
    board.publish({"state": "running", "step": 1}, {"step": 1}, take=False)
    await asyncio.sleep(0.01)
    assert not waiting.done()  # a metrics line is not a command
    ask = asyncio.ensure_future(board.request("pause", []))
    ((key, verb, _),) = await waiting
    assert verb == "pause" and board.inbox == []
    board.reply(key, {"step": 1})
    assert await ask == {"step": 1}
    assert await board.wait_commands(0.01) == []  # nothing within the timeout
    later = asyncio.ensure_future(board.wait_commands(30))
    await asyncio.sleep(0)
    await board.close({"state": "finished"})
    assert await later == []  # the end lets a waiting driver go
    assert await board.wait_commands(30) == []  # and one that asks after it does not wait


async def test_the_end_refuses_queued_and_later_commands():
    board = RunControl({"state": "running"})
    queued = asyncio.ensure_future(board.request("pause", []))
    taken = asyncio.ensure_future(board.request("checkpoint", []))
    await asyncio.sleep(0)
    board.inbox = board.inbox[:1]  # the run took `checkpoint` but ended before replying
    await board.close({"state": "failed"})
    assert "before it took this command" in (await queued)["error"]
    assert "ended (failed)" in (await taken)["error"]
    assert "it takes no more commands" in (await board.request("resume", []))["error"]
    assert board.calls == 0


@pytest.mark.parametrize("verb", ["scale-rollout", "scale-reward"])
def test_ctl_refuses_a_verb_without_its_value_before_joining_any_cluster(verb):
    run = [sys.executable, "-m", "asyncflow.cli", "ctl", verb]
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and f"{verb} needs a number" in out.stderr


def test_submit_checks_the_config_and_its_place_before_sending_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  steps: 0\n")
    outside = tmp_path / "ok.yaml"
    outside.write_text("run_name: ok\n")
    run = [sys.executable, "-m", "asyncflow.cli", "submit", "--address", "http://127.0.0.1:9"]
    out = subprocess.run([*run, str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "trainer.steps = 0" in out.stderr
    out = subprocess.run([*run, str(outside)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "not inside the working directory" in out.stderr
