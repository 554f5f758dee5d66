"""Prompts from a data set on disk: JSON lines or CSV, read by index.

Each record gives a prompt, as text or as chat messages (`[{"role": ..., "content": ...}]`,
rendered later with the checkpoint's chat template), and an answer for the reward. Training
prompt `i` is record `order[i % n]` of epoch `i // n`, each epoch in an order of its own drawn
from the seed, so a run resumed at a prompt cursor continues mid-epoch with no prompt skipped
or repeated. Held-out prompts come from `eval_path`, or else from the last `eval_fraction` of
the file, which training then never sees.

A JSON-lines file is indexed once by byte offsets and read record by record, so memory stays
flat however large it is; a CSV file (rows may span lines) is read whole.

    task:
      source: asyncflow.tasks.dataset:Dataset
      options: {path: data/train.jsonl, eval_path: data/eval.jsonl, messages: messages, answer: answer}
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from asyncflow.tasks import Example


class Dataset:
    symbols = None  # prompts are text: the checkpoint's tokenizer encodes them (model.path)

    def __init__(
        self, path: str, eval_path: str = "", prompt: str = "prompt", messages: str = "",
        answer: str = "answer", eval_fraction: float = 0.0, shuffle: bool = True, seed: int = 0,
    ):  # fmt: skip
        """`prompt` / `messages`: the column holding the prompt as text, or as chat messages (set
        `messages` to use it); `answer`: the column the reward checks against."""
        self.columns = (messages or prompt, answer)
        self.is_chat, self.shuffle, self.seed = bool(messages), shuffle, seed
        records = _Records(Path(path))
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction {eval_fraction} must be in [0, 1): a share of {path} held out")
        held = int(len(records) * eval_fraction)
        self._train, self._train_rows = records, len(records) - held
        self._eval, self._eval_rows = (records, range(self._train_rows, len(records)))
        if eval_path:
            self._eval = _Records(Path(eval_path))
            self._eval_rows = range(len(self._eval))
        if self._train_rows < 1:
            raise ValueError(f"data set {path} has no training records left (eval_fraction {eval_fraction})")
        for source, row in ((self._train, 0), (self._eval, self._eval_rows[0] if self._eval_rows else None)):
            if row is not None:
                self._example(source, row)  # a missing column is refused now, not at step 0
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            n = self._train_rows
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._orders = {epoch: order}  # one epoch at a time is all a cursor needs
        return order

    def example(self, index: int) -> Example:
        epoch, at = divmod(index, self._train_rows)
        return self._example(self._train, int(self._order(epoch)[at]))

    def eval_example(self, index: int) -> Example:
        if not self._eval_rows:
            raise ValueError(
                "this data set has no held-out prompts: set eval_path or eval_fraction, or "
                "task.eval_prompts: 0"
            )
        return self._example(self._eval, self._eval_rows[index % len(self._eval_rows)])

    def _example(self, records: _Records, row: int) -> Example:
        record = records[row]
        prompt_key, answer_key = self.columns
        missing = [k for k in (prompt_key, answer_key) if k not in record]
        if missing:
            raise ValueError(
                f"{records.path}, record {row}: no column {missing} (it has {sorted(record)}); set the "
                "task options prompt / messages / answer to the columns that hold them"
            )
        prompt = record[prompt_key]
        if self.is_chat and isinstance(prompt, str):  # a CSV cell holds the messages as JSON
            try:
                prompt = json.loads(prompt)
            except ValueError:
                pass  # refused just below
        if self.is_chat and not (
            isinstance(prompt, list) and all("role" in m and "content" in m for m in prompt)
        ):
            raise ValueError(
                f"{records.path}, record {row}: column {prompt_key!r} is not a list of chat messages "
                '({"role": ..., "content": ...}); set `prompt` instead of `messages` for text prompts'
            )
        return Example(prompt, str(record[answer_key]))


class _Records:
    """The records of one file, by position."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise ValueError(f"data set file {str(path)!r} does not exist; check task.options.path")
        self._rows: list[dict] | None = None
        self._offsets: list[int] = []
        if path.suffix == ".csv":
            with open(path, newline="") as f:
                self._rows = list(csv.DictReader(f))
        elif path.suffix in (".jsonl", ".json"):
            with open(path, "rb") as f:
                offset = 0
                for line in f:
                    if line.strip():
                        self._offsets.append(offset)
                    offset += len(line)
        else:
            raise ValueError(f"data set file {str(path)!r}: expected .jsonl or .csv")
        if len(self) == 0:
            raise ValueError(f"data set file {str(path)!r} has no records")

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._offsets)

    def __getitem__(self, row: int) -> dict[str, Any]:
        if self._rows is not None:
            return self._rows[row]
        with open(self.path, "rb") as f:
            f.seek(self._offsets[row])
            line = f.readline()
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{self.path}, record {row}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{self.path}, record {row}: expected a JSON object per line")
        return record
