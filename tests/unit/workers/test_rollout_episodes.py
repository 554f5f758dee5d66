"""A rollout worker with an environment writes whole episodes into the real store (trajectory,
loss mask, per-model-token log-probs and versions, the episode's record), and the reward worker
scores them by the environment's reward parts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from asyncflow.config import ModelConfig, RolloutConfig, WarmupConfig
from asyncflow.envs import episode_reward
from asyncflow.envs.arithmetic import Products, calculator_env
from dataplane.client import StoreClient
from dataplane.memory.local import serve_locally
from workers.episodes import EnvHost, EnvPool, Episodes
from workers.kinds import TokenKind
from workers.policy import make_tokenizer
from workers.reward import RewardWorker
from workers.rollout import RolloutWorker
from workers.samples import PARTITION, REWARD, ROLLOUT, SCHEMA, TRAINER
from workers.weights import WeightClient, WeightStore

pytestmark = pytest.mark.usefixtures("one_thread")


async def test_episodes_reach_the_store_and_are_scored_by_their_parts():
    address, stop = await serve_locally()
    store = await StoreClient.connect(address)
    try:
        await store.create_partition(PARTITION, SCHEMA, consumers=[ROLLOUT, REWARD, TRAINER])
        task = Products()
        kind = TokenKind(make_tokenizer(task), ModelConfig(max_positions=64),
                         RolloutConfig(max_new_tokens=24, n=2), multi_turn=True)  # fmt: skip
        model = kind.model(0)
        kind.warmup(model, task, WarmupConfig(steps=130, batch_size=64, lr=3e-3))
        weights = WeightClient(WeightStore(), remote=False)
        await weights.publish(0, model.state_dict())
        episodes = Episodes(EnvPool([EnvHost(calculator_env)]), kind.tokenizer, kind.stop_ids, max_turns=2,
                            episode_timeout_s=30, max_episode_tokens=48)  # fmt: skip
        worker = RolloutWorker(kind.engine(0), store, weights, n=2, groups_per_call=3, params=kind.params(),
                               kind=kind, episodes=episodes, examples=task.example)  # fmt: skip
        examples = [task.example(i) for i in range(3)]
        await store.put(PARTITION, _prompt_rows(kind, examples), group_size=2)
        assert await worker.work(3) == 6
        assert worker.stats["episodes"] == 6 and worker.stats["episode_turns"] >= 6
        reward = RewardWorker(episode_reward, kind, store, timeout_s=5, failure_reward=-1.0, batch_rows=6)
        assert await reward.work(6) == 6
        fields = ["response_ids", "loss_mask", "behavior_logprobs", "token_versions", "episode", "reward"]
        got = await store.get(PARTITION, fields, 6, TRAINER)
        records = [json.loads(e) for e in got["episode"]]
        assert any(r["turns"] == 2 for r in records)  # warm-started: the model calls the calculator
        for i in range(6):
            mask, record = got["loss_mask"][i], json.loads(got["episode"][i])
            assert len(mask) == len(got["response_ids"][i]) and mask.dtype == np.uint8
            assert len(got["behavior_logprobs"][i]) == len(got["token_versions"][i]) == int(mask.sum())
            assert set(got["token_versions"][i].tolist()) == {0}
            assert record["end"] in {"done", "max_turns", "max_episode_tokens"}
            assert got["reward"][i] == record["reward"].get("correct", 0.0)
            if record["turns"] == 2:  # the calculator's answer sits between the turns, not trained
                assert 0 in mask.tolist()
    finally:
        await store.close()
        await stop()


def _prompt_rows(kind: TokenKind, examples) -> dict:
    prompts = kind.prompts(examples)["prompt_ids"]
    return {
        "prompt_ids": [prompts[i // 2] for i in range(6)], "prompt_index": [i // 2 for i in range(6)],
        "sample_index": [i % 2 for i in range(6)], "answer": [examples[i // 2].answer for i in range(6)],
        "admit_version": [0] * 6, "info": [""] * 6,
    }  # fmt: skip
