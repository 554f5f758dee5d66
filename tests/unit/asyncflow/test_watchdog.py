"""The watchdog's parts without Ray: its config, how it measures a stage's progress into a
deadline, reading a real process' stacks (py-spy, and faulthandler where py-spy is missing),
and the stall line of the live view."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from rich.console import Console

from asyncflow.config import WatchdogConfig, load_config
from asyncflow.display import RunView
from asyncflow.errors import ConfigError
from asyncflow.workflow.stacks import _faulthandler_stack, stack
from asyncflow.workflow.watchdog import Clock, Watchdog, _stage_of
from tests.unit.asyncflow.test_config import ROOT
from tests.unit.asyncflow.test_display import METRICS

SLEEPER = """
import sys, time
from asyncflow.workflow.stacks import dump_on_signal
dump_on_signal()
def waiting_for_ever():
    print("ready", flush=True)
    time.sleep(60)
waiting_for_ever()
"""


def test_the_store_cannot_be_restarted_and_stages_keep_their_default_policy():
    with pytest.raises(ConfigError) as bad:
        load_config(ROOT / "examples" / "sort.yaml", ["watchdog.policy={store: restart}"])
    assert "watchdog.policy.store = 'restart'" in str(bad.value) and "set watchdog.policy.store: stop" in str(
        bad.value
    )
    config = load_config(ROOT / "examples" / "sort.yaml", ["watchdog.policy={reward: stop}"])
    assert config.watchdog.policy_of("reward") == "stop"
    assert config.watchdog.policy_of("trainer") == "restart" and config.watchdog.policy_of("store") == "stop"
    with pytest.raises(ConfigError, match="watchdog.deadline_s.trainer"):
        load_config(ROOT / "examples" / "sort.yaml", ["watchdog.deadline_s={trainer: -1}"])


def test_a_stage_deadline_is_a_factor_over_its_longest_measured_wait_with_a_floor():
    clock = Clock(last=0.0)
    clock.see(10, 0.0, waiting=True)  # the first reading: nothing measured yet
    assert clock.longest_s == 0
    clock.see(10, 50.0, waiting=False)  # idle (nothing to do) is not a wait
    clock.see(10, 52.0, waiting=True)
    clock.see(11, 55.0, waiting=True)  # progress after waiting 55 - 50 = 5 s
    clock.see(12, 56.0, waiting=True)
    assert clock.longest_s == 5.0 and clock.last == 56.0
    clock.starting = True  # restarted: its start-up is not measured
    clock.see(13, 156.0, waiting=True)
    assert clock.longest_s == 5.0 and not clock.starting

    pipe = SimpleNamespace(config=SimpleNamespace(watchdog=WatchdogConfig(floor_s=30, factor=10)))
    dog = Watchdog(pipe, clocks={"trainer": clock, "reward": Clock(last=0.0), "store": Clock(last=0.0)})
    assert dog.deadline("trainer") == 50.0  # 10 x 5 s
    assert dog.deadline("reward") == WatchdogConfig().first_deadline_s  # nothing measured yet
    clock.longest_s = 1.0
    assert dog.deadline("trainer") == 30.0  # the floor
    pipe.config.watchdog = WatchdogConfig(deadline_s={"trainer": 7})
    assert dog.deadline("trainer") == 7.0


def test_a_failure_is_told_apart_by_the_stage_it_names():
    from asyncflow.errors import StorageUnavailable, WorkerError

    assert _stage_of(StorageUnavailable("cannot reach the data store")) == "store"
    assert _stage_of(WorkerError("reward worker 0 died 3 times")) == "reward"
    assert _stage_of(WorkerError("something else")) is None


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    yield proc
    proc.kill()
    proc.wait()


def test_py_spy_reads_the_stack_of_a_frozen_process(sleeper):
    import signal

    sleeper.send_signal(signal.SIGSTOP)  # it answers nothing now
    started = time.monotonic()
    text = stack(sleeper.pid)
    assert "waiting_for_ever" in text and "<module>" in text, text
    assert time.monotonic() - started < 20


def test_without_py_spy_the_process_dumps_its_own_stack_on_a_signal(sleeper):
    text = _faulthandler_stack(sleeper.pid, "py-spy is not installed", timeout_s=5)
    assert text.startswith("(py-spy is not installed; faulthandler's dump instead)"), text
    assert "waiting_for_ever" in text
    assert sleeper.poll() is None  # the signal only made it write; it still runs


def test_a_stall_stays_in_the_live_table():
    view = RunView(total_steps=10, title="sort", enabled=False)
    view.stall("stall: reward made no progress for 12 s (deadline 10 s); restart; diagnosis in stalls/x.txt")
    out = io.StringIO()
    Console(file=out, width=200).print(view._table(METRICS, {}))
    assert "watchdog" in out.getvalue() and "stall: reward made no progress for 12 s" in out.getvalue()


def test_the_dump_file_lives_only_as_long_as_its_process(sleeper):
    from asyncflow.workflow.stacks import _open_dump, dump_file

    assert not dump_file(sleeper.pid).exists()  # unlinked at once: nothing stays in the temp directory
    assert _open_dump(sleeper.pid) is not None  # the reader finds it through /proc
