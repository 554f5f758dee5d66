"""The flow kind with a plug-in context encoder, without Ray or a store: the two-stage warm-start,
RL that leaves the frozen backbone bit-identical, and publications that carry the encoder alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncflow.config import EncoderConfig, FlowConfig, Patterns, TrainerConfig, WarmupConfig
from asyncflow.tasks.gaussians import EightGaussians
from asyncflow.tasks.inpainting import DigitInpainting
from services.flow import sde_sample, uniform_grid
from workers.flow_kind import FlowKind
from workers.trainer import TrainerWorker
from workers.weights import WeightClient, WeightStore

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ENCODER_ONLY = Patterns(patterns=("encoder.*",))


def _kind(supervised_steps: int = 0) -> FlowKind:
    encoder = EncoderConfig(hidden_size=8, num_layers=1, inject_layers=2, supervised_steps=supervised_steps)
    config = FlowConfig(hidden_size=32, num_layers=2, steps=4, encoder=encoder)
    return FlowKind(config, DigitInpainting())


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


async def _batch(kind: FlowKind, engine, groups: int = 2, n: int = 4) -> dict:
    """What the trainer reads from the store; reward: minus the squared error on the hidden pixels
    (cheap and deterministic, so the test needs no classifier)."""
    examples = [kind.task.example(i) for i in range(groups)]
    prompts = kind.prompts(examples)["condition"]
    outputs = await engine.generate(
        [kind.request(str(i), p, n, kind.params()) for i, p in enumerate(prompts)]
    )
    data = {k: list(v) for k, v in kind.results(outputs).items()}
    data["condition"] = [prompts[int(s.request_id)] for s in outputs]
    data["prompt_index"] = np.array([int(s.request_id) for s in outputs])
    data["sample_index"] = np.array([s.index for s in outputs])
    data["reward"] = np.array([-np.square(x[-1] - c[:64]).mean() for c, x in zip(data["condition"],
                              data["latents"])], dtype=np.float32)  # fmt: skip
    return data


async def test_rl_on_the_encoder_leaves_the_backbone_bit_identical_and_publishes_the_encoder_alone():
    kind = _kind()
    model = kind.model(0)
    with torch.no_grad():  # a trained encoder, so RL moves all of its tensors
        for p in model.encoder.inject.parameters():
            p.normal_(0, 0.1)
    backbone, encoder = _state(model.backbone), _state(model.encoder)
    store = WeightStore()
    trainer = TrainerWorker(
        model, None, WeightClient(store, remote=False),
        TrainerConfig(batch_prompts=2, lr=1e-2, trainable=ENCODER_ONLY), kind, n=4, staleness=0,
        reference=False,
    )  # fmt: skip
    engine = kind.engine(seed=1)
    await trainer.publish(whole=True)
    version, whole = await WeightClient(store, remote=False).pull(whole=True)
    await engine.update_weights(version, whole)
    for _ in range(2):
        trainer.train_on(await _batch(kind, engine))
        await trainer.publish(whole=False)
        version, tensors = await WeightClient(store, remote=False).pull()
        await engine.update_weights(version, tensors)
    assert all(torch.equal(backbone[k], v) for k, v in model.backbone.state_dict().items())
    moved = [k for k, v in model.encoder.state_dict().items() if not torch.equal(encoder[k], v)]
    assert set(moved) == {
        n.removeprefix("encoder.") for n, _ in model.named_parameters() if n.startswith("encoder.")
    }
    assert set(tensors) == {n for n, _ in model.named_parameters() if n.startswith("encoder.")}
    assert trainer.publish_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    encoder_bytes = sum(p.numel() * p.element_size() for p in model.encoder.parameters())
    assert trainer.publish_bytes == encoder_bytes < sum(t.numel() * t.element_size() for t in whole.values())
    # the engine, given the backbone once and the encoder since, samples as the trainer's model does
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    cond = torch.as_tensor(np.stack(kind.prompts([kind.task.example(i) for i in range(3)])["condition"]))
    engine_model = engine._open_model()
    assert torch.equal(sde_sample(engine_model, x, uniform_grid(4), cond, 0.0)[0],
                       sde_sample(model, x, uniform_grid(4), cond, 0.0)[0])  # fmt: skip


def test_warmup_pre_trains_the_backbone_then_the_encoder_alone():
    kind = _kind(supervised_steps=3)
    model = kind.model(0)
    for name, p in model.named_parameters():  # as trainer.trainable {patterns: [encoder.*]} leaves them
        p.requires_grad_(name.startswith("encoder."))
    fresh = _state(model)
    result = kind.warmup(model, kind.task, WarmupConfig(steps=3, batch_size=16, lr=1e-3))
    assert result["steps"] == 3 and result["encoder_steps"] == 3 and np.isfinite(result["encoder_loss"])
    after = model.state_dict()
    assert all(not torch.equal(fresh[k], after[k]) for k, _ in model.named_parameters())
    assert all(p.requires_grad == n.startswith("encoder.") for n, p in model.named_parameters())
    # with no supervised steps the encoder stays at zero: RL starts from the backbone itself
    kind = _kind(supervised_steps=0)
    model = kind.model(0)
    kind.warmup(model, kind.task, WarmupConfig(steps=2, batch_size=16, lr=1e-3))
    assert all(torch.count_nonzero(p) == 0 for p in model.encoder.inject.parameters())


def test_an_encoder_needs_a_conditional_task():
    with pytest.raises(ValueError, match="flow.encoder reads the task's condition"):
        FlowKind(FlowConfig(encoder=EncoderConfig()), EightGaussians())
    with pytest.raises(ValueError, match="inject into at most 2"):
        FlowConfig(num_layers=2, encoder=EncoderConfig(inject_layers=3))
