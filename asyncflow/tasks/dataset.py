"""Prompts from a data set, read by index: a JSON-lines, CSV or Parquet file, or a Hugging Face
`datasets` data set (asyncflow.tasks.records reads them all with flat memory).

Each record gives a prompt, as text or as chat messages (`[{"role": ..., "content": ...}]`,
rendered later with the checkpoint's chat template), and an answer for the reward. Held-out
prompts come from `eval_path`, from `eval_split` of the same data set, or else from the last
`eval_fraction` of it, which training then never sees.

Prompts the model has no room for are dropped from the index once, when it is first read: those
longer than `max_prompt_tokens`, by default the model's max positions minus
rollout.max_new_tokens, counted with the chat template applied as the rollout applies it (the
kind hands `limit_prompts` its token count: workers.kinds.make_kind). Dropping happens here and
not at admission, so the prompt cursor still counts every prompt the trainer will wait for.
Training prompt `i` is kept record `order[i % n]` of epoch `i // n`, each epoch in an order of its
own drawn from the seed, so a run resumed at a prompt cursor continues mid-epoch with no prompt
skipped or repeated.

    task:
      source: asyncflow.tasks.dataset:Dataset
      options: {path: data/train.jsonl, eval_path: data/eval.jsonl, messages: messages, answer: answer}
      # or {path: "hf:openai/gsm8k", subset: main, eval_split: test, prompt: question,
      #     user_template: "{prompt} End with: #### <answer>"}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from asyncflow.tasks import Example
from asyncflow.tasks.records import Records, check_columns, open_records


class Dataset:
    symbols = None  # prompts are text: the checkpoint's tokenizer encodes them (model.path)

    def __init__(
        self, path: str, eval_path: str = "", prompt: str = "prompt", messages: str = "",
        answer: str = "answer", split: str = "train", eval_split: str = "", subset: str = "",
        eval_fraction: float = 0.0, max_prompt_tokens: int = 0, user_template: str = "", metadata: str = "",
        shuffle: bool = True, seed: int = 0,
    ):  # fmt: skip
        """`path`: a .jsonl / .csv / .parquet file, a `datasets` save_to_disk directory, or hf:NAME
        (datasets.load_dataset: a hub name or local data files); `split` / `subset`: which part of a
        `datasets` data set (subset: load_dataset's configuration name).
        `prompt` / `messages`: the column holding the prompt as text, or as chat messages (set
        `messages` to use it); `answer`: the column the reward checks against.
        Held-out prompts: `eval_path` (its split `eval_split`, if it has splits), or `eval_split` of
        `path`, or the last `eval_fraction` of `path`; at most one of them.
        `max_prompt_tokens`: longest prompt kept (0: the room the model leaves).
        `metadata`: more columns, comma-separated, handed to the reward function as its `info`
        keyword (a dict per sample) when it takes one.
        `user_template`: a text prompt becomes one user message, this text with `{prompt}` replaced
        by it, rendered with the chat template (a chat model on a data set of plain questions)."""
        self.metadata = [c.strip() for c in metadata.split(",") if c.strip()]
        self.columns = (messages or prompt, answer, *self.metadata)
        if user_template and (messages or "{prompt}" not in user_template):
            raise ValueError(
                f"user_template {user_template!r} must hold {{prompt}} and applies to text prompts; "
                + ("unset messages" if messages else "add {prompt} where the question goes")
            )
        self.user_template = user_template
        self.is_chat, self.shuffle, self.seed = bool(messages), shuffle, seed
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction {eval_fraction} must be in [0, 1): a share of {path} held out")
        if sum(map(bool, (eval_path or eval_split, eval_fraction))) > 1:
            raise ValueError(
                f"held-out prompts from eval_path / eval_split and from eval_fraction {eval_fraction}: "
                "set one of them"
            )
        if subset and not path.startswith("hf:"):
            raise ValueError(
                f"subset {subset!r} names a configuration of hf:NAME; {path!r} has none: unset it"
            )
        if max_prompt_tokens < 0:
            raise ValueError(
                f"max_prompt_tokens {max_prompt_tokens} must be >= 0 (0: the room the model leaves)"
            )
        self.max_prompt_tokens = max_prompt_tokens
        train = open_records(path, self.columns, split, subset)
        held = int(len(train) * eval_fraction)
        if len(train) - held < 1:
            raise ValueError(f"data set {path} has no training records left (eval_fraction {eval_fraction})")
        self._splits: dict[str, tuple[Records, range]] = {
            "train": (train, range(len(train) - held)),
            "eval": (train, range(len(train) - held, len(train))),
        }
        if eval_path or eval_split:
            held_out = open_records(eval_path or path, self.columns, eval_split or "train", subset)
            self._splits["eval"] = (held_out, range(len(held_out)))
        for records, rows in self._splits.values():
            if rows:
                self._example(records, rows[0])  # a missing column is refused now, not at step 0
        self._count_tokens: Callable[[Any], int] | None = None
        self.limit: int | None = None  # longest prompt kept, in tokens (None: all kept)
        self.dropped: dict[str, int] = {}  # prompts dropped, by split, once its index is built
        self._kept: dict[str, np.ndarray] = {}
        self._orders: dict[int, np.ndarray] = {}

    def limit_prompts(self, count_tokens: Callable[[Any], int], room: int | None) -> None:
        """Drop prompts longer than `max_prompt_tokens`, or else than `room` (the model's max
        positions minus the longest response; None: no limit), counted by `count_tokens(prompt)`."""
        if self.max_prompt_tokens and room is not None and self.max_prompt_tokens > room:
            raise ValueError(
                f"task.options.max_prompt_tokens {self.max_prompt_tokens} is more than the {room} tokens "
                "the model leaves for a prompt (its max positions minus rollout.max_new_tokens); lower it"
            )
        self.limit = self.max_prompt_tokens or room
        self._count_tokens = count_tokens if self.limit is not None else None
        self._kept, self._orders, self.dropped = {}, {}, {}

    def kept(self, split: str) -> np.ndarray:
        """The rows of `split` ("train" or "eval") whose prompts fit the limit, in record order;
        tokenized once, on first use."""
        kept = self._kept.get(split)
        if kept is None:
            records, rows = self._splits[split]
            kept = np.asarray(rows, dtype=np.int64)
            if self._count_tokens is not None and len(kept):
                lengths = np.array([self._count_tokens(self._example(records, r).prompt) for r in rows])
                kept = kept[lengths <= self.limit]
                self.dropped[split] = len(rows) - len(kept)
                if not len(kept):
                    raise ValueError(
                        f"all {len(rows)} {split} prompts of {records.path} are longer than {self.limit} "
                        f"tokens (the shortest has {lengths.min()}); {self._limit_fix()}"
                    )
            self._kept[split] = kept
        return kept

    def _limit_fix(self) -> str:
        if self.max_prompt_tokens:
            return "raise task.options.max_prompt_tokens"
        return (
            "the limit is the room the model leaves (its max positions minus rollout.max_new_tokens): "
            "lower rollout.max_new_tokens or use a model with more positions"
        )

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            n = len(self.kept("train"))
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._orders = {epoch: order}  # one epoch at a time is all a cursor needs
        return order

    def example(self, index: int) -> Example:
        kept = self.kept("train")
        epoch, at = divmod(index, len(kept))
        return self._example(self._splits["train"][0], int(kept[self._order(epoch)[at]]))

    def eval_example(self, index: int) -> Example:
        records, rows = self._splits["eval"]
        if not rows:
            raise ValueError(
                "this data set has no held-out prompts: set eval_path, eval_split or eval_fraction, or "
                "task.eval_prompts: 0"
            )
        kept = self.kept("eval")
        return self._example(records, int(kept[index % len(kept)]))

    def _example(self, records: Records, row: int) -> Example:
        record = records[row]
        prompt_key, answer_key, *_ = self.columns
        check_columns(records.path, f"record {row}", self.columns, record)
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
        if self.user_template:
            prompt = [{"role": "user", "content": self.user_template.replace("{prompt}", str(prompt))}]
        info = json.dumps({c: record[c] for c in self.metadata}, default=_plain) if self.metadata else ""
        return Example(prompt, str(record[answer_key]), info)


def _plain(value: Any) -> Any:
    """A column value JSON does not know (NumPy and Arrow scalars, arrays) as a plain one."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "as_py"):
        return value.as_py()
    return str(value)
