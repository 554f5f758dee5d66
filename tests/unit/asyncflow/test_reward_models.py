"""Learned rewards: a sequence-classifier checkpoint and a scoring service over HTTP, each one
sample or one group per call, and their errors."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from asyncflow.config import parse_config
from asyncflow.errors import ConfigError
from asyncflow.tasks.reward_models import HTTPReward, RewardModel


def test_a_reward_model_scores_a_sample_and_a_group_alike(reward_model):
    rm = RewardModel(reward_model)
    prompts = ["What is 2 plus 2?", "What is 2 plus 2?", "What is 2 plus 2?"]
    responses = ["4", "2 + 2 = 4. #### 4", "five"]
    group = rm(prompts, responses, ["4"] * 3)
    alone = [rm(p, r, "4") for p, r in zip(prompts, responses)]
    assert group == pytest.approx(alone, abs=1e-5)  # padding in a group changes nothing
    assert len(set(group)) == 3 and all(isinstance(v, float) for v in group)
    with torch.no_grad():  # the checkpoint's own score of the text
        ids = rm.tokenizer(prompts[1] + responses[1], return_tensors="pt")
        assert rm.model(**ids).logits[0, 0].item() == pytest.approx(alone[1], abs=1e-5)


def test_a_reward_model_refuses_what_is_not_one(reward_model, checkpoints, tmp_path):
    with pytest.raises(ValueError, match="label 3 is not a label"):
        RewardModel(reward_model, label=3)
    with pytest.raises(ValueError, match="did not load as a sequence classifier"):
        RewardModel(str(tmp_path / "nothing"))


def test_reward_options_make_the_reward_and_are_checked_when_the_config_loads(reward_model):
    from workers.policy import make_reward_fn

    task = {"reward": "asyncflow.tasks.reward_models:RewardModel", "reward_options": {"path": reward_model}}
    config = parse_config({"task": task})
    assert isinstance(make_reward_fn(config.task), RewardModel)
    with pytest.raises(ConfigError, match="reward_options do not fit"):
        parse_config({"task": {**task, "reward_options": {"path": reward_model, "colour": "red"}}})


class _Scorer(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != "Bearer s3cret":
            self.send_response(401)
            self.end_headers()
            return
        rewards = [float(r == a) for r, a in zip(body["responses"], body["answers"])]
        out = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_an_http_reward_scores_samples_and_groups_and_fails_loudly(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/score"
    try:
        monkeypatch.setenv("SCORER_TOKEN", "s3cret")
        reward = HTTPReward(url, token_env="SCORER_TOKEN")
        assert reward("q", "4", "4") == 1.0
        assert reward(["q", "q"], ["4", "5"], ["4", "4"]) == [1.0, 0.0]
        monkeypatch.setenv("SCORER_TOKEN", "wrong")
        with pytest.raises(Exception, match="401"):  # recorded by the reward worker as a failure
            HTTPReward(url, token_env="SCORER_TOKEN")("q", "4", "4")
        monkeypatch.delenv("SCORER_TOKEN")
        with pytest.raises(ValueError, match="SCORER_TOKEN, which is not set"):
            HTTPReward(url, token_env="SCORER_TOKEN")
        with pytest.raises(ValueError, match="must start with http"):
            HTTPReward("ftp://x")
    finally:
        server.shutdown()
