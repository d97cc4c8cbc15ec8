"""Demo of rewards from scalar ratings, on digits, with a **synthetic** rater: `python -m retrain.ratings_demo`.

No human rated anything here. The "rater" is a known function, so we can check that the fitted reward
recovers it:

    rating(x) = 30 · ink(x) − 20 · thickness(x) + N(0, 0.25²)         (SYNTHETIC, for this demo only)

    ink(x)       = mean pixel intensity                                    (≈ 0.31 ± 0.03 on digits)
    thickness(x) = Σ x · box3(x) / Σ x, the mean 3×3 neighbourhood ink     (≈ 0.50 ± 0.07)
                   around inked pixels: high for fat strokes, low for thin ones

i.e. this rater likes a lot of ink drawn with thin strokes (long, fine digits), and is noisy.

Steps: rate the digits train split with the rater; write the images as PNGs and the ratings as a CSV
(the format a real rating campaign would hand over); fit a ratings reward from the CSV
(`rewards.ratings.fit_ratings`), report its held-out Spearman; check it on the untouched digits test
split against the noiseless rater; save it; then use it by name as the reward of a `DiffusionSteer-v0`
env on the embedded `digits-eps` model and compare its scores of generated digits with the rater's.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

RATER_NOISE = 0.25


def ink(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def thickness(images: torch.Tensor) -> torch.Tensor:
    box = F.avg_pool2d(F.pad(images, (1, 1, 1, 1)), 3, stride=1)
    return (images * box).sum(dim=(1, 2, 3)) / images.sum(dim=(1, 2, 3)).clamp(min=1e-6)


def synthetic_rating(images: torch.Tensor, noise: float = 0.0, generator: torch.Generator | None = None):
    """The SYNTHETIC rater: 30·ink − 20·thickness (+ Gaussian rater noise); images [N, 1, H, W] in [0, 1]."""
    rating = 30 * ink(images) - 20 * thickness(images)
    if noise:
        rating = rating + noise * torch.randn(rating.shape, generator=generator)
    return rating


def write_ratings_csv(images: torch.Tensor, ratings: torch.Tensor, folder: Path) -> Path:
    """PNG per image + ratings.csv (`image,score`), the hand-over format of `load_ratings_csv`."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    with (folder / "ratings.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "score"])
        for i, (image, rating) in enumerate(zip(images, ratings)):
            name = f"images/{i:05d}.png"
            Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8), mode="L").save(folder / name)
            w.writerow([name, f"{float(rating):.6f}"])
    return folder / "ratings.csv"


def main(argv: list[str] | None = None) -> int:
    import rewards
    from diffenv import generate
    from diffenv.data import load_digits_split, to_unit
    from rewards.ratings import fit_ratings, load_ratings_csv, spearman

    p = argparse.ArgumentParser(description="Fit a ratings reward to a SYNTHETIC digit rater (see module doc)")
    p.add_argument("--out", default="runs/ratings_demo", help="folder for the CSV, images and the fitted reward")
    p.add_argument("--features", default="digit_classifier", help="pixels | digit_classifier")
    p.add_argument("--head", default="mlp", choices=["ridge", "mlp"])
    p.add_argument("--generated", type=int, default=256, help="digits-eps samples to score at the end (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)

    train, _ = load_digits_split("train")
    train = to_unit(train)
    ratings = synthetic_rating(train, RATER_NOISE, torch.Generator().manual_seed(a.seed))
    csv_file = write_ratings_csv(train, ratings, out / "data")
    print(f"SYNTHETIC rater: rating = 30·ink − 20·thickness + N(0, {RATER_NOISE}²); "
          f"rated {len(train)} train digits -> {csv_file}")

    images, scores = load_ratings_csv(csv_file)
    reward, report = fit_ratings(images, scores, features=a.features, head=a.head, seed=a.seed)
    print(f"fit {a.head} on {a.features} features: held-out Spearman {report['spearman_holdout']:.3f} "
          f"(vs noisy ratings, {report['n_holdout']} rows never fitted on)")

    test, _ = load_digits_split("test")
    test = to_unit(test)
    with torch.no_grad():
        predicted = reward(test, torch.zeros(len(test), dtype=torch.long))
    print(f"digits test split: Spearman(reward, noiseless rater) = {spearman(predicted, synthetic_rating(test)):.3f}")
    path = reward.save(out / "ratings_head.safetensors")
    print(f"saved {path} (+ {path.with_suffix('.json').name}); use it as rewards.make('ratings', path='{path}')")

    if a.generated:
        result = generate(a.generated, batch_size=min(a.generated, 256), seed=a.seed, model="digits-eps",
                          reward=rewards.make("ratings", path=path), num_steps=10)
        truth = synthetic_rating(result.images)
        print(f"digits-eps samples ({a.generated}, env reward = the ratings reward): mean reward "
              f"{result.rewards.mean():.3f}, mean rater score {truth.mean():.3f}, "
              f"Spearman {spearman(result.rewards, truth):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
