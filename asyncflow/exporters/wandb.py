"""Weights & Biases: every point at its step, in a W&B run under <run_dir>/wandb. Offline
mode (the default) needs no network or account; `wandb sync RUN_DIR/wandb/offline-run-*`
uploads it later."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asyncflow.exporters.points import Point, missing_package


class WandB:
    def __init__(self, run_dir: Path, project: str, mode: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise missing_package("wandb", "wandb") from None
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
        self.run = wandb.init(
            project=project, dir=str(run_dir), name=run_dir.name, config=config, mode=mode,  # type: ignore[arg-type]
            settings=settings, reinit="create_new",
        )  # fmt: skip

    def write(self, step: int, points: list[Point]) -> None:
        self.run.log({p.tag: p.value for p in points}, step=step)

    def close(self) -> None:
        self.run.finish()
