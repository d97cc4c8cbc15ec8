"""Rewards from scalar ratings: recovering a known (synthetic) scoring function, CSV input, save/load,
use by name in the env."""

from __future__ import annotations

import pytest
import torch

import rewards
from rewards.ratings import fit_ratings, load_ratings, load_ratings_csv, spearman
from retrain.ratings_demo import synthetic_rating, write_ratings_csv

#: the held-out Spearman a fitted reward must reach against the noisy synthetic ratings (noise 0.25 caps
#: it near 0.95; a reward that had not recovered the function would sit far below)
MIN_HOLDOUT_SPEARMAN = 0.85


@pytest.fixture(scope="module")
def digits():
    from diffenv.data import load_digits_split, to_unit

    train, _ = load_digits_split("train")
    test, _ = load_digits_split("test")
    return to_unit(train), to_unit(test)


@pytest.fixture(scope="module")
def noisy_ratings(digits):
    return synthetic_rating(digits[0], noise=0.25, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("features,head", [("pixels", "ridge"), ("digit_classifier", "mlp")])
def test_fit_recovers_the_synthetic_rater(digits, noisy_ratings, features, head):
    train, test = digits
    reward, report = fit_ratings(train, noisy_ratings, features=features, head=head, epochs=200)
    assert report["n_holdout"] == round(0.2 * len(train)) and report["spearman_holdout"] > MIN_HOLDOUT_SPEARMAN
    with torch.no_grad():
        predicted = reward(test, torch.zeros(len(test), dtype=torch.long))
    assert spearman(predicted, synthetic_rating(test)) > MIN_HOLDOUT_SPEARMAN  # unseen digits, noiseless truth


def test_save_load_round_trip_and_use_by_name_in_the_env(digits, noisy_ratings, tmp_path):
    from diffenv import DiffusionSteerVectorEnv

    train, test = digits
    reward, report = fit_ratings(train, noisy_ratings, features="pixels", head="ridge")
    path = reward.save(tmp_path / "ratings.safetensors")
    assert path.is_file() and path.with_suffix(".json").is_file()
    loaded = rewards.make("ratings", path=str(path))
    conditions = torch.zeros(len(test), dtype=torch.long)
    torch.testing.assert_close(loaded(test, conditions), reward(test, conditions))
    assert loaded.report["spearman_holdout"] == pytest.approx(report["spearman_holdout"])
    env = DiffusionSteerVectorEnv(num_envs=4, model="digits-eps", reward=loaded, num_steps=2, seed=0)
    env.reset()
    for _ in range(2):
        _, r, terminated, _, info = env.step(torch.randn(4, 1, 8, 8))
    assert terminated.all() and torch.isfinite(r).all() and "ratings" in info["reward_components"]


def test_ratings_from_a_csv(digits, tmp_path):
    train, _ = digits
    ratings = synthetic_rating(train[:60])
    csv_file = write_ratings_csv(train[:60], ratings, tmp_path)
    images, scores = load_ratings_csv(csv_file)
    assert images.shape == (60, 1, 8, 8) and scores.shape == (60,)
    torch.testing.assert_close(images, (train[:60] * 255).round() / 255)  # 8-bit PNGs
    torch.testing.assert_close(scores, ratings, atol=1e-5, rtol=0)


def test_ratings_errors(tmp_path, digits):
    train, _ = digits
    bad = tmp_path / "bad.csv"
    bad.write_text("path,rating\nx.png,1\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['image', 'score'\]"):
        load_ratings_csv(bad)
    bad.write_text("image,score\nmissing.png,1\n")
    with pytest.raises(FileNotFoundError, match="line 2: image"):
        load_ratings_csv(bad)
    write_ratings_csv(train[:2], torch.tensor([1.0, 2.0]), tmp_path)
    (tmp_path / "ratings.csv").write_text("image,score\nimages/00000.png,nan\n")
    with pytest.raises(ValueError, match="line 2: score 'nan' is not a finite number"):
        load_ratings_csv(tmp_path / "ratings.csv")
    with pytest.raises(ValueError, match="unknown features"):
        fit_ratings(train[:50], torch.zeros(50), features="sift")
    with pytest.raises(ValueError, match="finite numbers"):
        fit_ratings(train[:50], torch.full((50,), float("nan")))
    head_only = tmp_path / "h.safetensors"
    from rewards.heads import MLPHead, save_head

    save_head(MLPHead(4), head_only)
    with pytest.raises(ValueError, match="not a ratings reward"):
        load_ratings(head_only)
