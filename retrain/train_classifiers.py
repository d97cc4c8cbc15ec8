"""Train the shipped digit reward model and judge: `python -m retrain.train_classifiers [--out DIR] [--seed 0]`.

Both networks train on the *train* split of `diffenv.data` (90 % for fitting, 10 % held back to fit a
softmax temperature), with light augmentation (±1-pixel shifts, small Gaussian pixel noise) so they
stay sensible on generated images, which are continuous-valued and slightly off-centre unlike the
0..16-level scans. Held-out numbers come from the *test* split and go to `metrics.json`.
Runs deterministically on CPU (wall time: docs/design.md §11).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from rewards.classifier import WEIGHTS_DIR, build_network

#: per model: architecture (what `classifier.build_network` reads) and the recipe that trains it
SPECS = {
    "digit_classifier": {
        "architecture": "DigitCNN",
        "kwargs": {"channels": [32, 64, 64], "hidden": 128},
        "recipe": {"epochs": 40, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "seed_offset": 0},
    },
    "digit_judge": {
        "architecture": "DigitMLP",
        "kwargs": {"hidden": [256, 96]},
        "recipe": {"epochs": 60, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-3, "seed_offset": 1},
    },
}
CALIBRATION_FRACTION = 0.1
SHIFT_PROB = 0.5  # probability that a training image is shifted by one pixel (in x and/or y)
MAX_NOISE_STD = 0.08  # per-image pixel noise std drawn from U(0, MAX_NOISE_STD)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random ±1-pixel shifts (zero fill = background) and Gaussian pixel noise; [B, 1, 8, 8] in [0, 1]."""
    batch, _, height, width = images.shape
    shift = torch.randint(-1, 2, (batch, 2), generator=generator)
    shift = shift * (torch.rand(batch, 1, generator=generator) < SHIFT_PROB)
    padded = F.pad(images, (1, 1, 1, 1))  # [B, 1, H + 2, W + 2]
    rows = 1 - shift[:, :1] + torch.arange(height)  # [B, H]
    cols = 1 - shift[:, 1:] + torch.arange(width)  # [B, W]
    shifted = padded[torch.arange(batch)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
    std = torch.rand(batch, 1, 1, 1, generator=generator) * MAX_NOISE_STD
    return (shifted + std * torch.randn(shifted.shape, generator=generator)).clamp(0.0, 1.0)


def fit(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: dict, seed: int,
        augment_fn=augment, logits_fn=None) -> None:
    """AdamW with a cosine learning-rate decay on minibatches augmented by `augment_fn(images, generator)`; the loss is
    on `logits_fn(images)` (default: the network itself; e.g. one expert of an ensemble)."""
    logits_fn = network if logits_fn is None else logits_fn
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(network.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps_per_epoch = math.ceil(len(images) / recipe["batch_size"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe["epochs"] * steps_per_epoch)
    network.train()
    for _ in range(recipe["epochs"]):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(recipe["batch_size"]):
            loss = F.cross_entropy(logits_fn(augment_fn(images[batch], generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    network.eval()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The softmax temperature minimising NLL on held-back data (Guo et al. 2017), by a log-spaced grid."""
    grid = torch.logspace(math.log10(0.25), math.log10(8.0), 301)
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    return float(grid[nll.argmin()])


def evaluate(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, mean log p(y | x) and expected calibration error of (already temperature-scaled) logits."""
    log_prob = F.log_softmax(logits, dim=1)
    confidence, predicted = log_prob.exp().max(dim=1)
    correct = (predicted == labels).float()
    bins = (confidence * n_bins).clamp(max=n_bins - 1).long()
    ece = sum(
        (bins == b).float().mean() * (correct[bins == b].mean() - confidence[bins == b].mean()).abs()
        for b in range(n_bins) if (bins == b).any()
    )
    return {
        "accuracy": float(correct.mean()),
        "mean_log_likelihood": float(log_prob.gather(1, labels[:, None]).mean()),
        "ece": float(ece),
    }


def train_one(name: str, spec: dict, data: dict, seed: int, out: Path) -> dict:
    """Train, calibrate, evaluate and save one model; returns its metrics."""
    recipe = spec["recipe"]
    torch.manual_seed(seed + recipe["seed_offset"])
    network = build_network(spec)
    start = time.perf_counter()
    fit(network, *data["fit"], recipe=recipe, seed=seed + recipe["seed_offset"])
    with torch.no_grad():
        temperature = fit_temperature(network(data["calibration"][0]), data["calibration"][1])
        test_logits = network(data["test"][0])
        train_logits = network(data["fit"][0])
    metrics = {
        "architecture": spec["architecture"],
        "parameters": sum(p.numel() for p in network.parameters()),
        "temperature": temperature,
        "train_accuracy": evaluate(train_logits, data["fit"][1])["accuracy"],
        **{f"test_{k}": v for k, v in evaluate(test_logits / temperature, data["test"][1]).items()},
        "test_mean_log_likelihood_uncalibrated": evaluate(test_logits, data["test"][1])["mean_log_likelihood"],
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    save(name, network, spec, temperature, seed, out)
    return metrics


def save(name: str, network: torch.nn.Module, spec: dict, temperature: float, seed: int, out: Path,
         trained_on: str = "diffenv.data train split (fit 90 %, temperature 10 %)", **extra) -> None:
    """`<name>.safetensors` and `<name>.json` (what `classifier.load_classifier` reads), `extra` keys appended."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    # one metadata key only: safetensors writes a multi-key header in random order (files would differ)
    save_file(state, str(out / f"{name}.safetensors"), metadata={"format": "pt"})
    config = {
        "name": name,
        "architecture": spec["architecture"],
        "kwargs": spec["kwargs"],
        "temperature": temperature,
        "image_shape": [1, 8, 8],
        "num_classes": 10,
        "input": "images in [0, 1], background 0",
        "trained_on": trained_on,
        "seed": seed,
        "recipe": spec["recipe"],
        **extra,
    }
    (out / f"{name}.json").write_text(json.dumps(config, indent=2) + "\n")


def load_data(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from diffenv.data import load_digits_split, to_unit

    x_train, y_train = load_digits_split("train")
    x_test, y_test = load_digits_split("test")
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
    n_cal = round(CALIBRATION_FRACTION * len(x_train))
    cal, fit_rows = order[:n_cal], order[n_cal:]
    x_train = to_unit(x_train)
    return {
        "fit": (x_train[fit_rows], y_train[fit_rows]),
        "calibration": (x_train[cal], y_train[cal]),
        "test": (to_unit(x_test), y_test),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="directory for weights, configs, metrics.json")
    parser.add_argument("--seed", type=int, default=0, help="seed for the calibration split, init and minibatches")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (keep it the same to reproduce weights bit for bit)")
    parser.add_argument("--only", choices=sorted(SPECS), action="append", help="train only these models")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    data = load_data(args.seed)
    results = {}
    for name in args.only or SPECS:
        results[name] = train_one(name, SPECS[name], data, args.seed, args.out)
        m = results[name]
        print(
            f"{name:17s} {m['architecture']:9s} params={m['parameters']:6d}  test acc={m['test_accuracy']:.4f}  "
            f"test mean log-lik={m['test_mean_log_likelihood']:.4f}  ECE={m['test_ece']:.4f}  "
            f"T={m['temperature']:.3f}  ({m['train_seconds']} s)",
            flush=True,
        )
    metrics_path = args.out / "metrics.json"
    previous = json.loads(metrics_path.read_text()) if metrics_path.is_file() and args.only else {}
    metrics = {**previous, **results, "seed": args.seed, "split": {k: len(v[1]) for k, v in data.items()}}
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {metrics_path}")
    return metrics


if __name__ == "__main__":
    main()
