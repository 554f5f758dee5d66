"""Multi-turn episodes: token in, token out across turns, loss masks the trainer honours, per-token
versions across a weight update mid-episode, and the episode's limits; real engine, real tokenizer,
real trainer, without a store."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from asyncflow.algorithms import pack
from asyncflow.config import ModelConfig, RolloutConfig, TrainerConfig
from asyncflow.envs import Example, Step
from services.models import build_model
from services.serving import Request, SamplingParams
from services.serving.torch_engine import TorchEngine
from workers.episodes import Batcher, EnvHost, EnvPool, Episodes
from workers.kinds import TokenKind
from workers.trainer import TrainerWorker

pytestmark = pytest.mark.usefixtures("one_thread")

OBSERVATION = "ab"  # one token on its own ([5]); the engine's "a", "b" decode to the same text


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer that merges "a" "b" into "ab": decoding sampled ids and encoding the text
    again gives other ids than were sampled."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "a": 3, "b": 4, "ab": 5, "c": 6}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


class Echo:
    """Answers every turn with OBSERVATION; never done (the episode ends at max_turns)."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s, self.turns = delay_s, 0

    async def reset(self, example: Example) -> str:
        return ""

    async def step(self, response: str) -> Step:
        await asyncio.sleep(self.delay_s)
        self.turns += 1
        return Step(OBSERVATION, reward={"turn": 1.0}, info={"seen": response})

    async def close(self) -> None:
        pass


class Recorder:
    """engine.generate, keeping each request's completions in the order they came."""

    def __init__(self, engine: TorchEngine):
        self.engine, self.turns = engine, {}

    async def __call__(self, requests):
        out = await self.engine.generate(requests)
        for c in out:
            self.turns.setdefault(c.request_id, []).append(c)
        return out


def setup(max_turns: int = 3, seed: int = 0, factory=Echo):
    tok = merging_tokenizer()
    model = build_model(len(tok), seed=seed)
    engine = TorchEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=seed)
    episodes = Episodes(
        EnvPool([EnvHost(factory)]), tok, [tok.eos_token_id], max_turns=max_turns, episode_timeout_s=30,
        max_episode_tokens=64,
    )  # fmt: skip
    return tok, model, engine, episodes


async def run_all(episodes, generate, count: int = 8, max_new_tokens: int = 6):
    params = SamplingParams(max_new_tokens=max_new_tokens)
    requests = [Request(f"e{i}", [1, 3 + i % 3], 1, params) for i in range(count)]
    return await asyncio.gather(*(episodes.run(generate, r, 0, Example("x", "y")) for r in requests))


async def test_trajectories_are_the_sampled_ids_and_the_observations_ids_never_re_encoded():
    tok, _, engine, episodes = setup()
    recorder = Recorder(engine)
    batcher = Batcher(recorder)
    trajectories = await run_all(episodes, batcher)
    assert batcher.calls == 3  # the 8 episodes' turns went to the engine together, turn by turn
    observation = tok.encode(OBSERVATION, add_special_tokens=False)
    assert observation == [5]
    changed = 0
    for t in trajectories:
        turns = recorder.turns[t.request_id]
        assert len(turns) == 3 and t.episode["end"] == "max_turns" and t.episode["turns"] == 3
        expected, mask = [], []
        for k, c in enumerate(turns):
            expected += c.response_ids
            mask += [1] * len(c.response_ids)
            if k < 2:  # an observation after every turn but the last
                expected += observation
                mask += [0]
        assert t.response_ids == expected and t.loss_mask == mask
        assert t.logprobs == [lp for c in turns for lp in c.logprobs]
        assert len(t.logprobs) == len(t.versions) == sum(mask)
        # each turn's prompt was exactly the ids so far: the engine read what it had sampled
        assert turns[1].prompt_ids == t.prompt_ids + turns[0].response_ids + observation
        changed += tok.encode(tok.decode(t.response_ids), add_special_tokens=False) != t.response_ids
    assert changed, "the test's tokenizer should re-encode some decoded trajectory differently"


async def test_the_trainer_scores_exactly_the_model_tokens_of_a_trajectory():
    tok, model, engine, episodes = setup()
    trajectories = await run_all(episodes, Batcher(engine.generate), count=4)
    kind = TokenKind(tok, ModelConfig(), RolloutConfig(temperature=1.0), multi_turn=True)
    data = {
        **kind.results(trajectories),
        "prompt_ids": [np.array(t.prompt_ids) for t in trajectories],
        "reward": np.array([1.0, 0.0, 0.0, 0.0], np.float32),
        "prompt_index": np.zeros(4, np.int64),
        "sample_index": np.arange(4),
    }
    assert {"loss_mask", "episode"} <= set(kind.rollout_fields) and "loss_mask" in kind.trainer_reads(False)
    assert json.loads(data["episode"][0])["end"] == "max_turns"
    trainer = TrainerWorker(model, None, None, TrainerConfig(batch_prompts=1), kind, n=4, staleness=0,
                            reference=False)  # fmt: skip
    metrics = trainer.train_on(data)
    # the recomputed log-probs are the engine's at the model's tokens: masks and positions line up
    assert metrics["logprob_diff_max"] < 1e-4
    assert metrics["tokens"] == sum(sum(t.loss_mask) for t in trajectories)
    assert metrics["tokens"] < sum(len(t.response_ids) for t in trajectories)  # environment tokens left out
    rows = kind.rows(data, [0, 1, 2, 3], reference=False)
    _, mask = kind.logprobs(model, rows)
    assert mask.sum().item() == metrics["tokens"]
    ref = kind.reference_logprobs(model, data)  # the reference scores the same tokens, one per model token
    assert [len(r) for r in ref] == [sum(t.loss_mask) for t in trajectories]


def test_the_loss_mask_leaves_environment_tokens_out_of_the_scored_positions():
    tok = merging_tokenizer()
    model = build_model(len(tok), seed=0)
    kind = TokenKind(tok, ModelConfig(), RolloutConfig(), multi_turn=True)
    data = {
        "prompt_ids": [np.array([1, 3])], "response_ids": [np.array([4, 2, 5, 6, 2])],
        "loss_mask": [np.array([1, 1, 0, 1, 1], np.uint8)], "behavior_logprobs": [np.zeros(4, np.float32)],
        "token_versions": [np.zeros(4, np.int64)], "reward": np.ones(1, np.float32),
    }  # fmt: skip
    (row,) = kind.rows(data, [0], reference=False)
    assert row.mask == [1, 1, 0, 1, 1]
    logprobs, mask = kind.logprobs(model, [row])
    assert mask[0].tolist() == [False, True, True, False, True, True]  # targets 4 2 [5] 6 2
    assert logprobs[mask].shape == (4,)  # one per model token, as many as its behaviour log-probs
    with pytest.raises(ValueError, match="one entry per response token"):
        pack([[1, 3]], [[4, 2, 5]], loss_masks=[[1, 1]])


async def test_versions_follow_a_weight_update_between_turns():
    tok, _, engine, episodes = setup()
    newer = build_model(len(tok), seed=7).state_dict()

    async def generate(requests):
        out = await engine.generate(requests)
        if engine.version == 0:  # the trainer publishes while the episode waits on its environment
            await engine.update_weights(1, newer)
        return out

    (t,) = await run_all(episodes, generate, count=1)
    first = t.loss_mask.index(0)  # the first observation's position: turn 1 is before it
    assert t.versions == [0] * first + [1] * (len(t.versions) - first)
    kind = TokenKind(tok, ModelConfig(), RolloutConfig(), multi_turn=True)
    data = {**kind.results([t]), "prompt_ids": [np.array(t.prompt_ids)], "reward": np.ones(1, np.float32)}
    (row,) = kind.rows(data, [0], reference=False)
    assert row.version(5) == 0  # its staleness counts from the oldest token's version


async def test_an_episode_ends_at_max_turns_and_on_its_timeout():
    _, _, engine, episodes = setup(max_turns=2)
    (t,) = await run_all(episodes, engine.generate, count=1)
    assert t.episode["end"] == "max_turns" and t.episode["turns"] == 2
    assert t.episode["reward"] == {"turn": 2.0}  # the parts of every turn, summed
    tok, _, engine, slow = setup(max_turns=5, factory=lambda: Echo(delay_s=5.0))
    slow.timeout_s = 0.3
    (t,) = await run_all(slow, engine.generate, count=1)
    assert t.episode["end"] == "timeout" and t.episode["turns"] == 1 and t.episode["seconds"] < 2
    assert sum(t.loss_mask) == len(t.versions) > 0  # the turns it had are kept
    assert slow.pool.hosts[0].live() == 0  # its environment was closed


async def test_a_slow_environment_does_not_hold_other_episodes_back():
    tok = merging_tokenizer()
    engine = TorchEngine(build_model(len(tok), seed=0), eos_token_id=2, pad_token_id=0, seed=0)
    delays = iter([0.5, 0.0])
    pool = EnvPool([EnvHost(lambda: Echo(delay_s=next(delays))) for _ in range(2)])
    episodes = Episodes(pool, tok, [2], max_turns=2, episode_timeout_s=30, max_episode_tokens=64)
    done: list[str] = []

    async def one(i: int):
        t = await episodes.run(Batcher(engine.generate), Request(f"e{i}", [1, 3], 1), 0, Example("x", "y"))
        done.append(t.request_id)

    await asyncio.gather(one(0), one(1))
    assert done == ["e1", "e0"]  # the fast episode's turns went on while the slow one waited


def test_the_warm_start_trains_the_models_turns_of_a_demonstration():
    from asyncflow.envs.arithmetic import Products
    from services.models import build_tokenizer

    task = Products()
    kind = TokenKind(build_tokenizer(list(task.symbols)), ModelConfig(), RolloutConfig(), multi_turn=True)
    example = task.example(0)
    (ids,), (mask,) = kind._targets(task, [example])
    text = kind.tokenizer.decode(ids, skip_special_tokens=True)
    product = example.answer
    assert text == f"<calc>{example.prompt[:-1]}</calc>[{product}]{product}"
    environment = [i for i, m in zip(ids, mask) if not m]
    assert kind.tokenizer.decode(environment) == f"[{product}]"  # the observation is not trained
    assert ids.count(kind.stop_ids[0]) == 2  # both model turns end with the stop token


class Broken(Echo):
    async def step(self, response: str) -> Step:
        raise KeyError("the game lost its board")


async def test_an_environment_that_fails_ends_its_episode_with_the_reason():
    _, _, engine, episodes = setup(factory=Broken)
    (t,) = await run_all(episodes, engine.generate, count=1)
    assert t.episode["end"] == "env_error" and t.episode["error"] == "KeyError: 'the game lost its board'"
    assert t.episode["turns"] == 1 and sum(t.loss_mask) == len(t.versions) > 0
