"""A run directory: the resolved config, metrics as JSONL, the trained-sample ledger,
checkpoints and a final summary. Everything a resumed run needs is in here.

    runs/<run_name>-<time>/  (run_dir_mode: timestamped; runs/<run_name>/ when stable)
      config.yaml            the resolved config (what `--resume` runs again)
      partition.json         the store whose samples partition this run created
      metrics.jsonl          one line per step
      trained.jsonl          per step, the (prompt, sample) pairs trained (and dropped, under dynamic
                             sampling): the exactly-once ledger
      checkpoints/step_N/    store/ (rows in flight), trainer/ (model, optimizer), state.json,
                             manifest.json (each file's size and SHA-256); written whole or not at all
      reference.safetensors  the warm-started policy (reference for the KL term)
      tensorboard/, wandb/   the live metric sinks' files (logging.tensorboard, logging.wandb)
      report.html            `asyncflow report RUN_DIR`'s page (when written here)
      summary.json           written at the end
      reward.svg             the reward curve
      trace.json             every actor's spans, Chrome / Perfetto trace format (appended per step)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from asyncflow.config import AsyncFlowConfig, load_config
from asyncflow.errors import ConfigError


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, config: AsyncFlowConfig) -> RunDir:
        """A new run directory: output_dir/<run_name>-<time> (run_dir_mode: timestamped), or
        output_dir/<run_name> (stable; `for_config` reopens it when it exists)."""
        out = Path(config.output_dir)
        if config.run_dir_mode == "stable":
            path = out / config.run_name
            if (path / "config.yaml").exists():
                raise ConfigError(
                    f"run directory {str(path)!r} already exists: continue it with `asyncflow run "
                    f"--resume {path}` (or --resume-if-exists), or give this run a run_name of its own"
                )
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = out / f"{config.run_name}-{stamp}"
            suffix = 1
            while path.exists():
                path = out / f"{config.run_name}-{stamp}-{suffix}"
                suffix += 1
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.config_path.write_text(yaml.safe_dump(config.public(), sort_keys=False))  # no secret on disk
        return run

    @classmethod
    def for_config(cls, config: AsyncFlowConfig) -> tuple[RunDir, bool]:
        """The stable run directory of `config` (output_dir/<run_name>) and whether it existed: an
        earlier attempt of the same run, to be continued from its last checkpoint."""
        if config.run_dir_mode != "stable":
            raise ConfigError(
                "continuing a run by its config needs run_dir_mode: stable (a run directory named "
                f"after run_name alone); {config.run_name!r} has run_dir_mode: {config.run_dir_mode}. "
                "Set run_dir_mode=stable, or pass the run directory: asyncflow run --resume RUN_DIR"
            )
        path = Path(config.output_dir) / config.run_name
        if (path / "config.yaml").exists():
            return cls(path), True
        return cls.create(config), False

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        if not run.config_path.exists():
            raise ConfigError(
                f"{str(path)!r} is not a run directory (no config.yaml); pass the folder that "
                "`asyncflow run` printed when the run started"
            )
        return run

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def reference_weights(self) -> Path:
        return self.path / "reference.safetensors"

    def config(self, overrides: list[str] | tuple[str, ...] = ()) -> AsyncFlowConfig:
        return load_config(self.config_path, overrides)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step_{step:07d}"

    def begin_checkpoint(self, step: int) -> Path:
        """An empty folder to write checkpoint `step` into; `commit_checkpoint` makes it the real one."""
        tmp = self.path / "checkpoints" / f".step_{step:07d}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)  # an earlier attempt that never finished
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, tmp: Path, step: int, state: dict) -> Path:
        """Write state.json and a manifest (every file's size and SHA-256), fsync them, then rename
        the folder to step_N in one step: a checkpoint is there whole or not at all."""
        (tmp / "state.json").write_text(json.dumps(state))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for p in [*files, tmp / MANIFEST]:
            _fsync(p)
        final = self.checkpoint_dir(step)
        if final.exists():  # the same step again (a stop right after a periodic checkpoint)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(final.parent)
        return final

    def latest_checkpoint(self, on_skip: Callable[[str], None] | None = None) -> tuple[Path, dict] | None:
        """The newest checkpoint that is whole (every file of its manifest there with its size and
        checksum) and its state; a damaged newer one is skipped, and `on_skip` told why."""
        for path in sorted((self.path / "checkpoints").glob("step_*"), reverse=True):
            problem = check_checkpoint(path)
            if problem is None:
                return path, json.loads((path / "state.json").read_text())
            if on_skip is not None:
                on_skip(f"checkpoint {path.name} is not usable ({problem}); trying the one before")
        return None

    # ------------------------------------------------------------------ the store's partition

    def claim_partition(self, store: str) -> None:
        """Record that this run creates its samples partition in the store named `store`, so that a
        later attempt of the same run may drop what a dead attempt left there."""
        (self.path / OWNER).write_text(json.dumps({"store": store}) + "\n")

    def owns_partition(self, store: str) -> bool:
        """Whether an earlier attempt of this run created the samples partition of store `store`."""
        try:
            return json.loads((self.path / OWNER).read_text()).get("store") == store
        except (OSError, ValueError):
            return False

    # ------------------------------------------------------------------ logs

    def log(self, metrics: dict[str, Any]) -> None:
        trained = metrics.pop("trained", None)
        dropped = metrics.pop("dropped", None)  # dynamic sampling: consumed, never trained
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if trained is not None:
            record = {"step": metrics["step"], "rows": trained, **({"dropped": dropped} if dropped else {})}
            with open(self.path / "trained.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_logs(self, step: int) -> None:
        """Forget steps after `step` (they are trained again after a resume from it), and a line a
        crash cut short."""
        for name in ("metrics.jsonl", "trained.jsonl"):
            file = self.path / name
            if file.exists():
                keep = [json.dumps(r) for r in _records(file) if r["step"] <= step]
                tmp = file.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(line + "\n" for line in keep))
                os.replace(tmp, file)

    def metrics(self) -> list[dict]:
        return _records(self.path / "metrics.jsonl")

    def trained(self) -> list[tuple[int, int]]:
        return [tuple(r) for record in _records(self.path / "trained.jsonl") for r in record["rows"]]

    def dropped(self) -> list[tuple[int, int]]:
        """The (prompt, sample) pairs dynamic sampling consumed without training them."""
        records = _records(self.path / "trained.jsonl")
        return [tuple(r) for record in records for r in record.get("dropped", [])]

    @property
    def trace_path(self) -> Path:
        return self.path / "trace.json"

    def append_trace(self, events: list[dict]) -> None:
        """Append trace events to trace.json, a JSON array in Chrome's trace format. The array is
        left open while the run goes on (Chrome and Perfetto read it so: the closing `]` is
        optional), and reopened when a closed one gets more events (a resumed run)."""
        if not events:
            return
        path = self.trace_path
        with open(path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            first = f.tell() == 0
            if not first:
                f.seek(max(f.tell() - 3, 0))
                tail = f.read()
                if tail.rstrip().endswith(b"]"):  # closed: take the `]` off again
                    f.truncate(f.tell() - len(tail) + tail.rstrip().rindex(b"]"))
            f.seek(0, os.SEEK_END)
            text = ",\n".join(json.dumps(e, separators=(",", ":")) for e in events)
            f.write((("[\n" if first else ",\n") + text).encode())

    def close_trace(self) -> None:
        """Close trace.json's array (the run ended), so that it is plain JSON too."""
        path = self.trace_path
        if not path.exists():
            return
        with open(path, "a+b") as f:  # only its last bytes are read: the trace can be large
            f.seek(max(f.seek(0, os.SEEK_END) - 3, 0))
            if not f.read().rstrip().endswith(b"]"):
                f.write(b"\n]\n")

    def trace(self) -> list[dict]:
        """trace.json's events, whether its array is closed or not (a run still going, or killed)."""
        text = self.trace_path.read_text().rstrip()
        if text.endswith("]"):
            return json.loads(text)
        try:
            return json.loads(text + "]")
        except ValueError:  # a kill cut the last event short: events are one per line
            return json.loads(text[: text.rfind(",\n")] + "]")

    def write_summary(self, summary: dict) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def summary(self) -> dict | None:
        """The summary of the run's last attempt that ended (None if none did)."""
        try:
            return json.loads((self.path / "summary.json").read_text())
        except (OSError, ValueError):
            return None


MANIFEST = "manifest.json"
OWNER = "partition.json"  # the store whose samples partition this run created


def check_checkpoint(path: Path) -> str | None:
    """None if the checkpoint at `path` is whole, else what is wrong with it."""
    try:
        json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return "its state.json is missing or cut short"
    if not (path / MANIFEST).exists():
        return None  # written before manifests: state.json, written last, says it finished
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"its {MANIFEST} is cut short"
    for name, want in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _records(file: Path) -> list[dict]:
    """The JSON lines of a log; a last line a crash cut short is left out."""
    if not file.exists():
        return []
    records = []
    for line in file.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break  # only the last line can be partial: the log is appended to, line by line
    return records


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
