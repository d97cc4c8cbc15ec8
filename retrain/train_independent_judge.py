"""Train the independent digits judge: `python -m retrain.train_independent_judge [--out DIR] [--seed 0]`.

`digit_judge_indep` (rewards/independent_judge.py) learns from the *test* split of `diffenv.data` only (360
digits the reward, `digit_judge` and the diffusion models never saw), under strong augmentations unlike the
reward's shift + noise: rotation, anisotropic scaling, shear, sub-pixel shifts, an elastic warp, stroke
thickening / thinning, blur, gamma / contrast and noise. Its held-out data is the *train* split: a seeded 20 %
slice fits the softmax temperature, the other 80 % gives accuracy, NLL and ECE before and after calibration
(`{out}/digit_judge_indep_metrics.json`, with the wall time). Deterministic on CPU (1 thread).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from rewards.classifier import WEIGHTS_DIR
from rewards.independent_judge import NAME, IndependentDigitJudge, gaussian_blur
from retrain.train_classifiers import evaluate, fit, fit_temperature, save

SPEC = {"architecture": "IndependentDigitJudge", "kwargs": {"hidden": [128, 64], "n_prototypes": 2160,
                                                            "blur_sigma": 0.8}}
RECIPE = {"epochs": 200, "batch_size": 60, "lr": 3e-3, "weight_decay": 1e-3, "prototype_views": 5,
          "calibration_fraction": 0.2}


def strong_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random geometry, stroke and photometric changes of images [B, 1, 8, 8] in [0, 1] (module docstring)."""
    batch = len(images)

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*(shape or (batch,)), generator=generator)

    # geometry: sampling grid = A · output coords + shift (+ a smooth elastic displacement on half the images)
    angle, scale, aspect, shear = uniform(-0.26, 0.26), uniform(0.85, 1.15), uniform(0.9, 1.1), uniform(-0.2, 0.2)
    rotation = torch.stack([torch.stack([angle.cos(), -angle.sin()], 1), torch.stack([angle.sin(), angle.cos()], 1)], 1)
    shearing = torch.eye(2).repeat(batch, 1, 1)
    shearing[:, 0, 1] = shear
    scaling = torch.diag_embed(torch.stack([1 / (scale * aspect), aspect / scale], 1))
    theta = torch.cat([rotation @ shearing @ scaling, uniform(-0.25, 0.25, batch, 2, 1)], 2)  # ±1 px: 1 px = 0.25
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # [B, 8, 8, 2]
    warp = torch.randn(batch, 2, 3, 3, generator=generator) * 0.08 * (torch.rand(batch, 1, 1, 1, generator=generator) < 0.5)
    grid = grid + F.interpolate(warp, size=images.shape[-2:], mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # stroke width: a quarter thickened (towards a 3×3 max), a quarter thinned (towards a 3×3 min)
    kind, amount = torch.rand(batch, 1, 1, 1, generator=generator), uniform(0.3, 0.7)[:, None, None, None]
    thick = F.max_pool2d(x, 3, stride=1, padding=1)
    thin = -F.max_pool2d(-x, 3, stride=1, padding=1)
    x = torch.where(kind < 0.25, x + amount * (thick - x), torch.where(kind < 0.5, x - amount * (x - thin), x))
    # blur on 40 %, then gamma, contrast and pixel noise
    blur = uniform(0, 1)[:, None, None, None] * (torch.rand(batch, 1, 1, 1, generator=generator) < 0.4)
    x = (1 - blur) * x + blur * gaussian_blur(x, 0.8)
    x = x.clamp(0, 1).pow(uniform(-0.35, 0.35).exp()[:, None, None, None]) * uniform(0.75, 1.0)[:, None, None, None]
    noise = uniform(0, 0.06)[:, None, None, None] * torch.randn(x.shape, generator=generator)
    return (x + noise).clamp(0, 1)


def fit_prototypes(judge: IndependentDigitJudge, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
    """The prototype expert's memory: each image blurred plus `prototype_views` augmented views; the kernel width τ
    minimises the leave-one-image-out NLL of the originals (an image's own views excluded)."""
    generator = torch.Generator().manual_seed(seed + 1)
    views = [images] + [strong_augment(images, generator) for _ in range(RECIPE["prototype_views"])]
    judge.prototypes.copy_(gaussian_blur(torch.cat(views), judge.blur_sigma).flatten(1))
    judge.prototype_labels.copy_(labels.repeat(len(views)))
    source = torch.arange(len(images)).repeat(len(views))  # [P]: which image a prototype came from
    exclude = source[None, :] == torch.arange(len(images))[:, None]  # [N, P]
    best = (math.inf, 1.0)
    for tau in torch.logspace(-1.5, 1.5, 61).tolist():
        judge.bandwidth.fill_(tau)
        nll = float(F.cross_entropy(judge.prototype_logits(images, exclude), labels))
        best = min(best, (nll, tau))
    judge.bandwidth.fill_(best[1])


def load_data(seed: int) -> dict:
    """Judge training data = the test split; held-out = the train split, cut into calibration and evaluation."""
    from diffenv.data import load_digits_split, split_indices, to_unit

    x_test, y_test = load_digits_split("test")
    x_train, y_train = load_digits_split("train")
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
    n_cal = round(RECIPE["calibration_fraction"] * len(x_train))
    cal, held = order[:n_cal], order[n_cal:]
    x_train = to_unit(x_train)
    return {"fit": (to_unit(x_test), y_test), "calibration": (x_train[cal], y_train[cal]),
            "heldout": (x_train[held], y_train[held]), "fit_rows": split_indices("test").tolist()}


def train(seed: int, out: Path) -> dict:
    data = load_data(seed)
    torch.manual_seed(seed)
    judge = IndependentDigitJudge(**{k: tuple(v) if isinstance(v, list) else v for k, v in SPEC["kwargs"].items()})
    start = time.perf_counter()
    # the orientation-descriptor expert: the shipped classifiers' AdamW + cosine recipe on strong augmentations
    fit(judge, *data["fit"], recipe=RECIPE, seed=seed, augment_fn=strong_augment, logits_fn=judge.mlp_logits)
    fit_prototypes(judge, *data["fit"], seed=seed)
    with torch.no_grad():
        temperature = fit_temperature(judge(data["calibration"][0]), data["calibration"][1])
        seconds = round(time.perf_counter() - start, 1)
        x, y = data["heldout"]
        logits = judge(x)
        raw, calibrated = evaluate(logits, y), evaluate(logits / temperature, y)
        metrics = {
            "trained_on": f"diffenv.data test split ({len(data['fit'][1])} images), strong augmentations",
            "heldout": f"diffenv.data train split: {len(data['calibration'][1])} calibration (temperature), "
                       f"{len(y)} evaluation (numbers below)",
            "temperature": temperature, "prototype_bandwidth": float(judge.bandwidth),
            "heldout_accuracy": calibrated["accuracy"],
            "heldout_nll_uncalibrated": -raw["mean_log_likelihood"], "heldout_nll": -calibrated["mean_log_likelihood"],
            "heldout_ece_uncalibrated": raw["ece"], "heldout_ece": calibrated["ece"],
            "heldout_accuracy_mlp_expert": evaluate(judge.mlp_logits(x), y)["accuracy"],
            "heldout_accuracy_prototype_expert": evaluate(judge.prototype_logits(x), y)["accuracy"],
            "fit_accuracy": evaluate(judge(data["fit"][0]), data["fit"][1])["accuracy"],
            "parameters": sum(p.numel() for p in judge.parameters()),
            "train_seconds": seconds, "seed": seed, "threads": torch.get_num_threads(),
        }
    save(NAME, judge, {**SPEC, "recipe": RECIPE}, temperature, seed, out, trained_on=metrics["trained_on"],
         fit_rows=data["fit_rows"])
    (out / f"{NAME}_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="directory for the weights, config and metrics")
    parser.add_argument("--seed", type=int, default=0, help="seed for init, minibatches, augmentations, calibration split")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (keep 1 to reproduce bit for bit)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    metrics = train(args.seed, args.out)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
