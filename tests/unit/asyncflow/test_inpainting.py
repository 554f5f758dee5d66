"""asyncflow.tasks.inpainting: the task's conditions and the reward against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncflow.tasks.inpainting import DigitInpainting, InpaintingReward, agreement, classifier, reward

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def task() -> DigitInpainting:
    return DigitInpainting(mask_size=4)


def test_a_condition_is_the_masked_digit_and_its_mask(task):
    for i in range(5):
        example = task.eval_example(i)
        c = np.asarray(example.condition, np.float32)
        masked, mask = c[:64], c[64:]
        assert set(np.unique(mask)) == {0.0, 1.0} and (mask == 0).sum() == 16  # one 4 x 4 square hidden
        assert np.array_equal(masked, mask * task.test[i]) and example.answer == str(task.test_labels[i])
    assert task.eval_example(3) == task.eval_example(3) and task.example(7) == task.example(7)
    x, cond = task.data(0, 32)
    assert x.shape == (32, 64) and cond.shape == (32, 128) and np.array_equal(cond[:, :64], cond[:, 64:] * x)
    with pytest.raises(ValueError, match="mask_size=9"):
        DigitInpainting(mask_size=9)


def test_the_reward_is_the_label_probability_and_the_known_pixels_error(task):
    example = task.eval_example(0)
    c, clean, label = np.asarray(example.condition), task.test[0], int(example.answer)
    with torch.no_grad():
        p = torch.softmax(classifier()(torch.from_numpy(clean[None])), -1)[0].numpy()
    parts = reward(c, clean, example.answer)
    assert parts["consistency"] == 0.0  # the clean digit agrees with every known pixel
    assert parts["label"] == pytest.approx(float(p[label]), abs=1e-6)
    assert agreement(c, clean, example.answer) == float(p.argmax() == label)
    off = clean.copy()
    known = np.flatnonzero(c[64:])
    off[known[:3]] += 0.5  # three known pixels off by 0.5: squared error 3 * 0.25 over 48 known pixels
    off[np.flatnonzero(c[64:] == 0)] = 1.0  # hidden pixels do not count for consistency
    assert reward(c, off, example.answer)["consistency"] == pytest.approx(-0.75 / 48)
    weighted = InpaintingReward(consistency_weight=2.0)(c, off, example.answer)
    assert weighted == {
        "label": reward(c, off, example.answer)["label"],
        "consistency": pytest.approx(-1.5 / 48),
    }
    # the reward classifier reads clean test digits as their labels
    agree = [
        agreement(task.eval_example(i).condition, task.test[i], task.eval_example(i).answer)
        for i in range(100)
    ]
    assert np.mean(agree) > 0.9


def test_a_sample_or_answer_of_another_task_is_refused(task):
    c = task.eval_example(0).condition
    with pytest.raises(ValueError, match="a sample of 64"):
        reward(c, np.zeros(2), "3")
    with pytest.raises(ValueError, match="digit label"):
        reward(c, np.zeros(64), "3.0,1.0")
