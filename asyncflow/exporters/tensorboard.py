"""TensorBoard: every point as a scalar at its step, in event files under
<run_dir>/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."""

from __future__ import annotations

from pathlib import Path

from asyncflow.exporters.points import Point, missing_package


class TensorBoard:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_package("tensorboard", "tensorboard") from None
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, points: list[Point]) -> None:
        for p in points:
            self.writer.add_scalar(p.tag, p.value, global_step=step)
        self.writer.flush()  # a live run: each step is readable once written

    def close(self) -> None:
        self.writer.close()
