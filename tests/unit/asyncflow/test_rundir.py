"""Run directories: timestamped and stable modes, continuing a run by its config, and the rule that
lets a run drop only a samples partition an earlier attempt of itself left in the store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from asyncflow.config import load_config
from asyncflow.errors import ConfigError
from asyncflow.rundir import RunDir

EXAMPLE = Path(__file__).parents[3] / "examples" / "sort.yaml"


def _config(tmp_path, *overrides: str):
    return load_config(EXAMPLE, [f"output_dir={tmp_path}", *overrides])


def test_timestamped_mode_makes_a_new_directory_each_time(tmp_path):
    config = _config(tmp_path)
    assert config.run_dir_mode == "timestamped"  # the default: every local run is its own
    first, second = RunDir.create(config), RunDir.create(config)
    assert first.path != second.path
    assert first.path.name.startswith("sort-") and first.path.parent == tmp_path


def test_stable_mode_names_the_directory_after_the_run_and_refuses_to_start_it_twice(tmp_path):
    config = _config(tmp_path, "run_dir_mode=stable")
    run = RunDir.create(config)
    assert run.path == tmp_path / "sort" and run.config_path.exists()
    with pytest.raises(ConfigError, match="already exists: continue it with `asyncflow run --resume"):
        RunDir.create(config)


def test_for_config_reopens_an_earlier_attempt_of_the_same_run(tmp_path):
    config = _config(tmp_path, "run_dir_mode=stable")
    run, existed = RunDir.for_config(config)
    assert not existed and run.path == tmp_path / "sort"
    again, existed = RunDir.for_config(config)
    assert existed and again.path == run.path
    other, existed = RunDir.for_config(_config(tmp_path, "run_dir_mode=stable", "run_name=other"))
    assert not existed and other.path == tmp_path / "other"


def test_for_config_needs_the_stable_mode(tmp_path):
    with pytest.raises(ConfigError, match="run_dir_mode: stable"):
        RunDir.for_config(_config(tmp_path))


def test_a_run_owns_only_the_partition_it_claimed_in_that_store(tmp_path):
    run = RunDir.create(_config(tmp_path, "run_dir_mode=stable"))
    assert not run.owns_partition("sort-1")
    run.claim_partition("sort-1")
    assert run.owns_partition("sort-1") and not run.owns_partition("sort-2")
    assert RunDir(run.path).owns_partition("sort-1")  # a later attempt reads it from the directory
    assert not RunDir.create(_config(tmp_path)).owns_partition("sort-1")  # another run


class FakeStore:
    """What Pipeline.fresh asks of the store before it creates the partition."""

    def __init__(self, partitions: set[str]):
        self.partitions = set(partitions)

    async def store_stats(self) -> dict:
        return {"partitions": {p: {} for p in self.partitions}}

    async def drop_partition(self, name: str) -> None:
        self.partitions.remove(name)

    async def create_partition(self, name: str, *args, **kw) -> None:
        assert name not in self.partitions
        self.partitions.add(name)


class Created(Exception):
    """Raised once the partition exists: the rest of a fresh start needs actors."""


def _fresh(run: RunDir, config, store: FakeStore) -> None:
    from asyncflow.workflow.pipeline import Pipeline

    pipe = Pipeline.__new__(Pipeline)  # no actors: only the partition rule runs
    pipe.config, pipe.run, pipe.client = config, run, store

    async def stop_here(*args, **kw):
        raise Created

    pipe._ranks = stop_here  # type: ignore[method-assign]
    with pytest.raises(Created):
        asyncio.run(pipe.fresh())


def test_a_dead_attempt_s_partition_is_dropped_another_run_s_is_refused(tmp_path):
    config = _config(tmp_path, "run_dir_mode=stable", "dataplane.name=sort-1")
    run = RunDir.create(config)
    store = FakeStore(set())
    _fresh(run, config, store)  # the first attempt creates it and records that
    assert store.partitions == {"samples"} and run.owns_partition("sort-1")
    _fresh(RunDir.open(run.path), config, store)  # it died before a checkpoint: the next starts clean
    assert store.partitions == {"samples"}

    other = _config(tmp_path, "dataplane.name=sort-1")  # another run, the same store name
    with pytest.raises(ConfigError, match="already holds a 'samples' partition"):
        _fresh(RunDir.create(other), other, store)


def test_jobs_run_python_dash_m_and_can_resume():
    from asyncflow.jobs import entrypoint

    assert (
        entrypoint("examples/sort.yaml", ["a=1"])
        == "python -m asyncflow.cli run examples/sort.yaml --set a=1"
    )
    assert (
        entrypoint("c.yaml", [], resume_if_exists=True)
        == "python -m asyncflow.cli run c.yaml --resume-if-exists"
    )
    assert (
        entrypoint("c.yaml", ["a=1"], resume="/runs/x")
        == "python -m asyncflow.cli run --resume /runs/x --set a=1"
    )


@pytest.mark.parametrize("spec", ["asyncflow", "asyncflow[redis]==0.1.0", "AsyncFlow>=0.1", "asyncflow @ x"])
def test_deploy_ray_pip_refuses_pypis_unrelated_asyncflow(tmp_path, spec):
    with pytest.raises(ConfigError, match="unrelated project"):
        _config(tmp_path, f"deploy.ray.pip=[{spec!r}]")
    assert _config(tmp_path, "deploy.ray.pip=['redis[hiredis]>=5.0', 'asyncflow-rl']").deploy.ray.pip


def test_the_plain_view_prints_long_lines_whole(capsys, monkeypatch):
    from asyncflow.display import RunView

    view = RunView(10, "sort")  # stderr is not a terminal here: one line per note, never wrapped
    note = "x" * 200 + " end"
    view.note(note)
    assert note in capsys.readouterr().err
