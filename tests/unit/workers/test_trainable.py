"""Training part of the model (trainer.trainable): what the optimizer holds, what stays frozen bit
for bit, what a publication carries, that an engine holding the base follows it, and that
checkpoints round-trip; without Ray."""

from __future__ import annotations

import sys

import pytest
import torch
from test_trainer import _long_tail_batch, kind_of  # pytest puts this folder on sys.path

from asyncflow.algorithms import pack, token_logprobs
from asyncflow.config import TrainerConfig, parse_config
from asyncflow.errors import ConfigError, WorkerError
from services.models import build_model, build_tokenizer
from services.serving.torch_engine import TorchEngine
from workers.trainable import check_trainable, make_trainable, plain_model, publication
from workers.trainer import TrainerWorker
from workers.weights import WeightClient, WeightStore

TOK = build_tokenizer(list("0123456789>"))
LORA = {"lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}}


def trainer_with(trainable, weights=None, seed: int = 2) -> TrainerWorker:
    config = TrainerConfig(batch_prompts=4, lr=1e-2, trainable=trainable)
    return TrainerWorker(
        build_model(len(TOK), seed=seed),
        None,
        weights,
        config,
        kind_of(TOK),
        n=4,
        staleness=1,
        reference=False,
    )


@pytest.fixture(scope="module")
def data():
    """A batch of 4 groups of 4 samples with rewards, sampled from another model (off-policy)."""
    return _long_tail_batch(build_model(len(TOK), seed=1), TOK)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_patterns_train_their_parameters_and_leave_the_rest_bit_identical(data):
    trainer = trainer_with({"patterns": ["model.layers.1.*"]})
    before = snapshot(trainer.model)
    trainer.train_on(data)
    after = trainer.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    trained = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert trained and all(n.startswith("model.layers.1.") for n in trained)
    assert set(changed) <= set(trained) and changed  # the frozen rest is bit for bit what it was
    held = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(held) == len(trained) and all(p.requires_grad for p in held)
    assert sorted(publication(trainer.model, trainer.config.trainable, whole=False)) == trained


def test_lora_trains_adapters_only_and_publishes_the_merged_targets(data):
    trainer = trainer_with(LORA)
    base = {k: v.clone() for k, v in trainer.model.get_base_model().state_dict().items() if "lora_" not in k}
    trainer.train_on(data)
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    adapters = {n for n, p in trainer.model.named_parameters() if id(p) in held}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    after = trainer.model.get_base_model().state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)  # the base weights never move
    part = publication(trainer.model, trainer.config.trainable, whole=False)
    whole = publication(trainer.model, trainer.config.trainable, whole=True)
    names = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]
    assert sorted(part) == names
    assert set(whole) == set(build_model(len(TOK), seed=0).state_dict())  # the base model's names
    merged = plain_model(trainer.model).state_dict()
    assert all(torch.equal(part[n], merged[n]) and torch.equal(whole[n], merged[n]) for n in part)
    assert any(not torch.equal(part[n], base[n.replace(".weight", ".base_layer.weight")]) for n in part)


async def test_an_engine_holding_nothing_or_the_last_version_follows_partial_publications(data):
    """The first publication is whole, later ones carry the adapters' targets; an engine that
    starts later gets the whole one under the newest, an engine that kept up takes the part."""
    weights = WeightClient(WeightStore(), remote=False)
    trainer = trainer_with(LORA, weights)
    await trainer.publish()  # version 0, whole
    whole_bytes = trainer.publish_bytes
    early = TorchEngine(
        build_model(len(TOK), seed=7), eos_token_id=TOK.eos_token_id, pad_token_id=0, version=-1
    )
    await early.update_weights(*(await weights.pull(whole=True)))
    trainer.train_on(data)
    await trainer.publish(whole=False)  # version 1
    assert 0 < trainer.publish_bytes < whole_bytes / 4
    version, part = await weights.pull(1)
    assert version == 1 and sorted(part) == sorted(
        publication(trainer.model, trainer.config.trainable, whole=False)
    )
    await early.update_weights(version, part)
    late = TorchEngine(
        build_model(len(TOK), seed=8), eos_token_id=TOK.eos_token_id, pad_token_id=0, version=-1
    )
    await late.update_weights(*(await weights.pull(1, whole=True)))
    merged = plain_model(trainer.model)
    ids, targets, mask = pack([[1, 3, 4, 5], [1, 9]], [[6, 7, 2], [8, 8, 8, 2]])
    with torch.no_grad():
        expected = token_logprobs(merged(ids).logits[:, :-1], targets)
        for engine in (early, late):
            got = token_logprobs(engine._model(ids).logits[:, :-1], targets)
            assert (got - expected)[mask].abs().max().item() < 1e-6


async def test_the_store_refuses_a_partial_first_publication():
    weights = WeightClient(WeightStore(), remote=False)
    with pytest.raises(WorkerError, match="publish the first version whole"):
        await weights.publish(0, {"w": torch.ones(2)}, whole=False)


def test_a_lora_checkpoint_round_trips_and_resumes_the_same_run(data, tmp_path):
    first = trainer_with(LORA)
    first.train_on(data)
    first.save(str(tmp_path / "ckpt"))
    resumed = trainer_with(LORA, seed=5)  # other initial weights: the checkpoint must bring them all
    assert resumed.load(str(tmp_path / "ckpt")) == 1
    for a, b in zip(first.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert str(first.optimizer.state_dict()) == str(resumed.optimizer.state_dict())
    first.train_on(data)
    resumed.train_on(data)  # the same step from the same state: the same weights, bit for bit
    for (name, a), b in zip(first.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"trained trainer.trainable=.*lora.*resume with"):
        trainer_with({"patterns": ["model.layers.1.*"]}).load(str(tmp_path / "ckpt"))


def test_targets_and_patterns_that_match_nothing_name_what_exists():
    model = build_model(len(TOK), seed=0)
    bad = TrainerConfig(trainable={"lora": {"targets": ["q_proj", "qkv_proj"]}}).trainable
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no .*'k_proj'.*'o_proj'"):
        check_trainable(model, bad)
    bad = TrainerConfig(trainable={"patterns": ["model.layers.*", "encoder.*"]}).trainable
    with pytest.raises(
        ValueError, match=r"\['encoder\.\*'\] match no parameter.*model\.embed_tokens\.weight"
    ):
        make_trainable(model, bad)


def test_a_bad_target_is_refused_before_any_actor_starts(checkpoints):
    from asyncflow.workflow.checks import check

    config = parse_config({
        "model": {"path": checkpoints["qwen2"]},
        "task": {"source": "asyncflow.tasks.sorting:SortDigits", "eval_prompts": 0},
        "trainer": {"trainable": {"lora": {"targets": ["c_attn"]}}},
    })  # fmt: skip
    with pytest.raises(ConfigError, match=r"\['c_attn'\] match no .*q_proj"):
        check(config)


def test_lora_without_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[lora\]'"):
        make_trainable(build_model(len(TOK), seed=0), TrainerConfig(trainable=LORA).trainable)


def test_the_reference_weights_of_a_lora_run_are_the_base_architecture(data, tmp_path):
    from safetensors.torch import load_model

    trainer = trainer_with(LORA)
    trainer.train_on(data)
    trainer.save_weights(str(tmp_path / "ref.safetensors"))
    plain = build_model(len(TOK), seed=9)
    load_model(plain, str(tmp_path / "ref.safetensors"))
    ids = torch.tensor([[1, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, trainer.model(ids).logits, atol=1e-6)
