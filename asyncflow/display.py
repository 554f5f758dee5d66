"""The live view of a run: step, reward, throughput, staleness, queues, idle time.

A rich table redrawn in place on a terminal; one plain line every few seconds otherwise
(CI logs, `ray job logs`). It only reads the metrics the recipe hands it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


class RunView:
    def __init__(self, total_steps: int, title: str, enabled: bool = True):
        self.total_steps, self.title, self.enabled = total_steps, title, enabled
        # Not a terminal (a file, CI, `ray job logs`): rich would take 80 columns and wrap long lines
        # mid-word; print each line whole instead.
        self.console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
        self.live = Live(console=self.console, refresh_per_second=4, transient=False) if self._tty() else None
        self._last_line = 0.0
        self.last_stall: str | None = None  # the watchdog's latest diagnosis, shown until the run ends

    def _tty(self) -> bool:
        return self.enabled and sys.stderr.isatty()

    def __enter__(self) -> RunView:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def stall(self, text: str) -> None:
        """A stall or failure the watchdog diagnosed: printed at once, and kept in the table."""
        self.last_stall = text
        if self.enabled:
            self.console.print(f"[bold red]{text}[/]", markup=True, highlight=False)

    def update(self, m: dict[str, Any], workers: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.update(self._table(m, workers))
        elif time.monotonic() - self._last_line > 5 or m["step"] == self.total_steps:
            self._last_line = time.monotonic()
            self.console.print(
                f"step {m['step']}/{self.total_steps}  reward {m['reward_mean']:.3f} "
                f"(avg10 {m['reward_avg10']:.3f})  "
                f"{m['samples_per_s']:.0f} samples/s  staleness {m['staleness']}"
            )

    def _table(self, m: dict[str, Any], workers: dict[str, Any]) -> Table:
        t = Table(title=f"{self.title}: step {m['step']}/{self.total_steps}", show_header=False, expand=False)
        t.add_column(style="bold")
        t.add_column()
        bar = int(24 * m["step"] / self.total_steps)
        t.add_row("progress", "#" * bar + "." * (24 - bar) + f" {m['elapsed_s']:.0f} s")
        t.add_row("reward", f"{m['reward_mean']:.3f}   last 10 steps {m['reward_avg10']:.3f}")
        t.add_row("throughput", f"{m['samples_per_s']:.1f} samples/s   {m['tokens_per_s']:.0f} tokens/s")
        t.add_row("staleness", "  ".join(f"lag {k}: {v}" for k, v in m["staleness"].items()))
        t.add_row("loss", f"{m.get('loss', 0):.4f}   mismatch_kl {m.get('mismatch_kl', 0):.2e}")
        t.add_row("trainer", f"idle {m['trainer_idle_frac']:.0%}   version {m['version']}")
        for role, info in workers.items():
            t.add_row(role, info)
        if self.last_stall:
            t.add_row("watchdog", f"[red]{self.last_stall}[/]")
        return t
