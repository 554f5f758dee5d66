"""A run directory: the resolved config, metrics as JSONL, the trained-sample ledger,
checkpoints and a final summary. Everything a resumed run needs is in here.

    runs/<run_name>-<time>/
      config.yaml            the resolved config (what `--resume` runs again)
      metrics.jsonl          one line per step
      trained.jsonl          per step, the (prompt, sample) pairs trained: the exactly-once ledger
      checkpoints/step_N/    store/ (rows in flight), trainer/ (model, optimizer), state.json
      reference.safetensors  the warm-started policy (reference for the KL term)
      summary.json           written at the end
      reward.svg             the reward curve
"""

from __future__ import annotations

import json
import time
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
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(config.output_dir) / f"{config.run_name}-{stamp}"
        suffix = 1
        while path.exists():
            path = Path(config.output_dir) / f"{config.run_name}-{stamp}-{suffix}"
            suffix += 1
        path.mkdir(parents=True)
        run = cls(path)
        run.config_path.write_text(yaml.safe_dump(config.public(), sort_keys=False))  # no secret on disk
        return run

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

    def latest_checkpoint(self) -> tuple[Path, dict] | None:
        """The newest complete checkpoint (state.json is written last) and its state."""
        done = sorted((self.path / "checkpoints").glob("step_*/state.json"))
        if not done:
            return None
        return done[-1].parent, json.loads(done[-1].read_text())

    # ------------------------------------------------------------------ logs

    def log(self, metrics: dict[str, Any]) -> None:
        trained = metrics.pop("trained", None)
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if trained is not None:
            with open(self.path / "trained.jsonl", "a") as f:
                f.write(json.dumps({"step": metrics["step"], "rows": trained}) + "\n")

    def truncate_logs(self, step: int) -> None:
        """Forget steps after `step` (they are trained again after a resume from it)."""
        for name in ("metrics.jsonl", "trained.jsonl"):
            file = self.path / name
            if file.exists():
                keep = [line for line in file.read_text().splitlines() if json.loads(line)["step"] <= step]
                file.write_text("".join(line + "\n" for line in keep))

    def metrics(self) -> list[dict]:
        file = self.path / "metrics.jsonl"
        return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []

    def trained(self) -> list[tuple[int, int]]:
        file = self.path / "trained.jsonl"
        if not file.exists():
            return []
        return [tuple(r) for line in file.read_text().splitlines() for r in json.loads(line)["rows"]]

    def write_summary(self, summary: dict) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
