"""Learned rewards: a sequence-classifier checkpoint, or a scoring service over HTTP.

Both are reward functions with state, made once per reward worker from `task.reward_options`:

    task:
      reward: asyncflow.tasks.reward_models:RewardModel
      reward_options: {path: my-org/my-reward-model, label: 0, max_tokens: 1024}
    reward: {num_workers: 2, per_group: true, timeout_s: 30}

They run inside the reward stage: `reward.num_workers` actors (each `reward.num_cpus`) make the
scaled pool, each call has the stage's deadline (`reward.timeout_s`; a call past it is a recorded
failure, never a dead run), and the stage only reads as many rows as it scores, so a slow model
holds samples back in the store instead of piling them up. With `reward.per_group` a call scores
a whole group in one forward pass (or one request).
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from typing import Any


class RewardModel:
    """The score of `prompt + response` under a sequence-classification checkpoint
    (AutoModelForSequenceClassification: a local directory or a hub id), logit `label`."""

    def __init__(
        self, path: str, label: int = 0, max_tokens: int = 1024, revision: str = "", threads: int = 0
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if threads:  # torch threads of the reward worker's process (0: as they are)
            torch.set_num_threads(threads)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, revision=revision or None)
            model = AutoModelForSequenceClassification.from_pretrained(path, revision=revision or None)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"reward model {path!r} did not load as a sequence classifier ({e}); point "
                "task.reward_options.path at a checkpoint saved by AutoModelForSequenceClassification"
            ) from None
        if not 0 <= label < model.config.num_labels:
            raise ValueError(
                f"task.reward_options.label {label} is not a label of {path!r} "
                f"(it has {model.config.num_labels}); use 0..{model.config.num_labels - 1}"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model.config.pad_token_id = self.tokenizer.pad_token_id  # how it finds each row's last token
        self.tokenizer.padding_side = "right"
        self.model, self.label, self.max_tokens = model.eval(), label, max_tokens
        self._lock = threading.Lock()  # the worker calls from a thread pool: one forward at a time

    def __call__(self, prompt: Any, response: Any, answer: Any) -> float | list[float]:
        """One sample (strings) or one group (lists of strings, with reward.per_group)."""
        import torch

        group = isinstance(response, list)
        prompts, responses = (prompt, response) if group else ([prompt], [response])
        texts = [p + r for p, r in zip(prompts, responses)]
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        with self._lock, torch.no_grad():
            scores = self.model(**batch).logits[:, self.label].float().tolist()
        return scores if group else scores[0]


class HTTPReward:
    """Rewards from a scoring service: POST `{"prompts": [...], "responses": [...], "answers":
    [...]}` as JSON to `url`, which answers `{"rewards": [...]}`, one number (or dict of named
    parts) per sample. A bearer token, if the service wants one, comes from the environment
    variable `token_env` (never from the config, which is written to the run directory)."""

    def __init__(self, url: str, timeout_s: float = 30.0, token_env: str = ""):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"task.reward_options.url {url!r} must start with http:// or https://")
        self.url, self.timeout_s = url, timeout_s
        self.headers = {"Content-Type": "application/json"}
        if token_env:
            token = os.environ.get(token_env)
            if not token:
                raise ValueError(
                    f"task.reward_options.token_env names {token_env}, which is not set in the "
                    "environment of the reward workers; export it before the run"
                )
            self.headers["Authorization"] = f"Bearer {token}"

    def __call__(self, prompt: Any, response: Any, answer: Any) -> Any:
        group = isinstance(response, list)
        body = {"prompts": prompt, "responses": response, "answers": answer}
        if not group:
            body = {k: [v] for k, v in body.items()}
        request = urllib.request.Request(self.url, json.dumps(body).encode(), self.headers)
        with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:  # raises on 4xx / 5xx
            rewards = json.loads(reply.read())["rewards"]
        if len(rewards) != len(body["responses"]):
            raise ValueError(
                f"{self.url} returned {len(rewards)} rewards for {len(body['responses'])} samples"
            )
        return rewards if group else rewards[0]
