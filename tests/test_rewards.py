"""The rewards package: the Reward contract, the registry, the shipped classifiers, JPEG and weighted sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rewards
from rewards import CallableReward, Reward, WeightedSum
from rewards.registry import REWARDS

BUILTINS = ["digit_classifier", "digit_judge", "jpeg_compressibility", "jpeg_incompressibility", "weighted_sum"]


@pytest.fixture(scope="module")
def test_digits():
    from diffenv.data import load_digits_split, to_unit

    images, labels = load_digits_split("test")
    return to_unit(images), labels  # [N, 1, 8, 8] in [0, 1], [N]


@pytest.fixture(scope="module")
def classifier():
    return rewards.make("digit_classifier")


@pytest.fixture(scope="module")
def judge():
    return rewards.make("digit_judge")


def random_batch(batch=8, channels=1, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, size, size, generator=generator)
    return images, torch.randint(0, 10, (batch,), generator=generator)


# ---------------------------------------------------------------- registry


def test_builtins_registered_and_made_by_name():
    assert set(BUILTINS) <= set(rewards.names())
    for name in BUILTINS:
        kwargs = {"weights": {"jpeg_compressibility": 1.0}} if name == "weighted_sum" else {}
        reward = rewards.make(name, device="cpu", **kwargs)
        assert isinstance(reward, Reward) and reward.name == name


def test_register_round_trip(monkeypatch):
    monkeypatch.setattr(REWARDS, "_items", dict(REWARDS._items))

    @rewards.register("brightness")
    def brightness(scale: float = 1.0):
        return CallableReward(lambda images, conditions: scale * images.mean(dim=(1, 2, 3)), name="brightness")

    assert "brightness" in rewards.names()
    images, conditions = random_batch()
    reward = rewards.make("brightness", scale=2.0)
    torch.testing.assert_close(reward(images, conditions), 2.0 * images.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("brightness")(lambda: None)


def test_unknown_name_suggests_closest_and_lists_all():
    with pytest.raises(ValueError, match="Did you mean 'digit_classifier'") as err:
        rewards.make("digit_clasifier")
    for name in BUILTINS:
        assert name in str(err.value)


def test_as_reward_accepts_names_rewards_dicts_and_callables(classifier):
    assert rewards.as_reward("jpeg_compressibility").name == "jpeg_compressibility"
    assert rewards.as_reward(classifier) is classifier
    assert isinstance(rewards.as_reward({"jpeg_compressibility": 1.0}), WeightedSum)

    def mean_pixel(images, conditions):
        return images.mean(dim=(1, 2, 3))

    wrapped = rewards.as_reward(mean_pixel)
    assert isinstance(wrapped, CallableReward) and wrapped.name == "mean_pixel" and not wrapped.differentiable
    with pytest.raises(TypeError, match="cannot make a reward from int"):
        rewards.as_reward(3)


# ---------------------------------------------------------------- digit classifier and judge


def test_classifier_rewards_true_label_high_wrong_label_low(classifier, test_digits):
    images, labels = test_digits
    right = classifier(images, labels)
    wrong = classifier(images, (labels + 1) % 10)
    assert right.shape == (len(labels),) and right.dtype == torch.float32
    assert right.mean() > 0.95 and wrong.mean() < 0.02
    assert ((right >= 0) & (right <= 1)).all()


def test_classifier_modes_agree(test_digits):
    images, _ = test_digits[0][:64], test_digits[1][:64]
    conditions = torch.arange(64) % 10  # mixes right and wrong labels
    prob = rewards.make("digit_classifier", mode="prob")
    log_prob = rewards.make("digit_classifier", mode="log_prob")
    correct = rewards.make("digit_classifier", mode="correct")
    torch.testing.assert_close(prob(images, conditions).log(), log_prob(images, conditions), atol=1e-4, rtol=1e-4)
    predicted = prob.logits(images).argmax(dim=1)
    torch.testing.assert_close(correct(images, conditions), (predicted == conditions).float())
    assert prob.differentiable and log_prob.differentiable and not correct.differentiable
    torch.testing.assert_close(
        torch.log_softmax(log_prob.logits(images), dim=1).gather(1, conditions[:, None]).squeeze(1),
        log_prob(images, conditions),
    )


@pytest.mark.parametrize("name, min_accuracy", [("digit_classifier", 0.97), ("digit_judge", 0.90)])
def test_held_out_accuracy(name, min_accuracy, test_digits):
    images, labels = test_digits
    accuracy = rewards.make(name, mode="correct")(images, labels).mean()
    assert accuracy >= min_accuracy


def test_judge_is_a_different_model(classifier, judge, test_digits):
    assert type(classifier.network) is not type(judge.network)
    shapes = lambda net: sorted(tuple(p.shape) for p in net.parameters())  # noqa: E731
    assert shapes(classifier.network) != shapes(judge.network)
    images, _ = test_digits[0][:64], test_digits[1][:64]
    assert not torch.allclose(classifier.logits(images), judge.logits(images))


def test_classifier_rejects_bad_shapes_and_conditions(classifier):
    images, conditions = random_batch()
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\].*\(8, 1, 16, 16\)"):
        classifier(torch.rand(8, 1, 16, 16), conditions)
    with pytest.raises(ValueError, match="0..9"):
        classifier(images, torch.full((8,), 10))
    with pytest.raises(ValueError, match="mode must be one of"):
        rewards.make("digit_classifier", mode="accuracy")


def test_missing_weights_say_how_to_regenerate(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m retrain.train_classifiers"):
        rewards.make("digit_judge", weights_dir=tmp_path)


def test_gradients_flow_in_differentiable_mode(classifier):
    images, conditions = random_batch()
    images.requires_grad_(True)
    classifier(images, conditions).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(p.grad is None for p in classifier.parameters())  # the reward model stays frozen
    with torch.no_grad():
        assert not classifier(images, conditions).requires_grad
    assert not rewards.make("digit_classifier", mode="correct")(images, conditions).requires_grad


# ---------------------------------------------------------------- JPEG


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_constant_image_more_compressible_than_noise(channels):
    noise, conditions = random_batch(batch=4, channels=channels, size=32)
    images = torch.cat([torch.full_like(noise, 0.5), noise])
    conditions = torch.cat([conditions, conditions])
    compress = rewards.make("jpeg_compressibility")(images, conditions)
    incompress = rewards.make("jpeg_incompressibility")(images, conditions)
    assert compress.shape == (8,) and compress.dtype == torch.float32
    assert (compress[:4] > compress[4:].max()).all() and (compress < 0).all()
    assert (incompress[:4] < incompress[4:].min()).all()
    torch.testing.assert_close(compress, -incompress)


def test_jpeg_rejects_two_channels_and_is_not_differentiable():
    reward = rewards.make("jpeg_compressibility")
    assert not reward.differentiable
    images, conditions = random_batch(channels=2)
    with pytest.raises(ValueError, match="1 or 3 channels, got C=2"):
        reward(images, conditions)


# ---------------------------------------------------------------- weighted sum


def test_weighted_sum_equals_hand_sum_and_exposes_components(classifier, test_digits):
    images, labels = test_digits[0][:32], test_digits[1][:32]
    jpeg = rewards.make("jpeg_compressibility")
    total = rewards.make("weighted_sum", weights={"digit_classifier": 1.0, "jpeg_compressibility": 0.1})
    expected = classifier(images, labels) + 0.1 * jpeg(images, labels)
    torch.testing.assert_close(total(images, labels), expected)
    parts = total.components(images, labels)
    assert set(parts) == {"digit_classifier", "jpeg_compressibility", "weighted_sum"}
    torch.testing.assert_close(parts["weighted_sum"], expected)
    torch.testing.assert_close(parts["jpeg_compressibility"], jpeg(images, labels))
    assert not total.differentiable


def test_weighted_sum_differentiable_only_if_all_parts_are(classifier):
    both = WeightedSum({classifier: 2.0, "digit_judge": -0.5}, name="agree")
    assert both.differentiable
    images, conditions = random_batch()
    images.requires_grad_(True)
    both(images, conditions).sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unique"):
        WeightedSum({"digit_classifier": 1.0, classifier: 1.0})
    with pytest.raises(ValueError, match="finite number"):
        WeightedSum({"digit_classifier": math.nan})


# ---------------------------------------------------------------- the Reward contract


def test_callable_returning_numpy_or_list_is_wrapped():
    images, conditions = random_batch()
    from_numpy = CallableReward(lambda x, c: x.mean(dim=(1, 2, 3)).numpy().astype(np.float64), name="np_mean")
    from_list = CallableReward(lambda x, c: [float(v) for v in c], name="as_list")
    value = from_numpy(images, conditions)
    assert value.dtype == torch.float32 and value.shape == (8,)
    torch.testing.assert_close(value, images.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(from_list(images, conditions), conditions.float())
    assert from_numpy.components(images, conditions).keys() == {"np_mean"}


def test_nan_reward_raises_naming_the_reward():
    def flaky(images, conditions):
        out = np.ones(len(images), dtype=np.float32)
        out[:3] = np.nan
        return out

    images, conditions = random_batch()
    with pytest.raises(ValueError, match="reward 'flaky' returned NaN for 3 of 8 images"):
        CallableReward(flaky)(images, conditions)
    inside_sum = WeightedSum({flaky: 1.0, "jpeg_compressibility": 1.0})
    with pytest.raises(ValueError, match="reward 'flaky'"):
        inside_sum(images, conditions)


def test_bad_inputs_and_outputs_are_named():
    reward = rewards.make("jpeg_compressibility")
    images, conditions = random_batch()
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] \(4-D\), got 3-D shape \(8, 8, 8\)"):
        reward(images[:, 0], conditions)
    with pytest.raises(ValueError, match=r"shape \[B\] = \(8,\).*got \(7,\)"):
        reward(images, conditions[:7])
    with pytest.raises(ValueError, match="integer tensor"):
        reward(images, conditions.float())
    with pytest.raises(ValueError, match="float tensor"):
        reward((images * 255).to(torch.uint8), conditions)
    column = CallableReward(lambda x, c: torch.zeros(len(x), 1), name="column")
    with pytest.raises(ValueError, match=r"'column' returned shape \(8, 1\), expected \[B\] = \(8,\)"):
        column(images, conditions)
