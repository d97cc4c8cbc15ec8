"""A reward fitted to human scalar ratings: a ridge or MLP head on frozen image features.

No preference pairs are needed: rows are `(image, score)`, from a CSV (`image,score` columns; image paths
relative to the CSV) or from arrays. The head regresses standardised scores on standardised features;
a held-out split (`holdout`, default 20 %) is never fitted on and gives the reported Spearman rank
correlation, the number to look at before trusting the reward::

    images, scores = load_ratings_csv("ratings.csv")
    reward, report = fit_ratings(images, scores, features="digit_classifier", head="ridge")
    print(report["spearman_holdout"]); reward.save("runs/ratings/head.safetensors")
    env = DiffusionSteerVectorEnv(reward=rewards.make("ratings", path="runs/ratings/head.safetensors"))

| `features` | what | dims |
|---|---|---|
| `"pixels"` | the flattened image (resized to the fitted size) | C·H·W |
| `"digit_classifier"` | penultimate layer of the shipped digit CNN (8×8 grey digits) | 128 |
| `"clip:PATH"` | unit-norm CLIP image embedding (`rewards.clip.CLIPEncoder`) | CLIP projection dim |

Saved as safetensors (head weights + feature/score statistics) plus a JSON config (features, image
shape, head layout, the fit report). `python -m retrain.ratings_demo` runs the whole loop on digits
with a synthetic rater.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rewards.base import Reward
from rewards.heads import MLPHead, load_head, save_head
from rewards.registry import register

HEADS = ("ridge", "mlp")
RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
DEAD_FEATURE = 0.05  # features whose std is below this fraction of the mean std are ignored


class Features(nn.Module):
    """Frozen image features [B, D] for a `features` spec (see the module table)."""

    def __init__(self, spec: str, image_shape: tuple[int, int, int]):
        super().__init__()
        self.spec, self.image_shape = spec, tuple(int(s) for s in image_shape)
        if spec == "pixels":
            self.net = None
        elif spec == "digit_classifier":
            from rewards.classifier import IMAGE_SHAPE, load_classifier

            if self.image_shape != IMAGE_SHAPE:
                raise ValueError(f"features 'digit_classifier' need {IMAGE_SHAPE} images, got {self.image_shape}")
            cnn = load_classifier("digit_classifier").network
            self.net = nn.Sequential(cnn.features, *list(cnn.head)[:-1])  # [B, 128] after the last SiLU
        elif spec.startswith("clip:"):
            from rewards.clip import CLIPEncoder

            self.net = CLIPEncoder(spec[len("clip:"):])
        else:
            raise ValueError(f"unknown features {spec!r}; expected 'pixels', 'digit_classifier' or 'clip:PATH'")
        if self.net is not None:
            self.net.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c, h, w = self.image_shape
        if images.shape[1] != c:
            raise ValueError(f"ratings features {self.spec!r} were fitted on {c}-channel images, got {images.shape[1]}")
        if self.spec == "pixels":
            if tuple(images.shape[-2:]) != (h, w):
                images = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            return images.flatten(1)
        if self.spec == "digit_classifier":
            return self.net(images * 2.0 - 1.0)  # the CNN's own input scaling (DigitCNN.forward)
        return self.net.image_embeds(images)


class RatingsReward(Reward):
    """`score = head((φ(x) − μ_φ)/σ_φ) · σ_y + μ_y`: a regression of ratings on frozen features φ."""

    def __init__(self, features: Features, head: MLPHead, stats: dict[str, torch.Tensor], report: dict | None = None,
                 name: str = "ratings", differentiable: bool = False):
        super().__init__()
        self.name, self.differentiable = name, bool(differentiable)
        self.features, self.head = features, head.eval().requires_grad_(False)
        for key in ("feature_mean", "feature_std", "target_mean", "target_std"):
            self.register_buffer(key, stats[key].float())
        self.report = dict(report or {})

    def score(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        z = (self.features(images.float()) - self.feature_mean) / self.feature_std
        return self.head(z) * self.target_std + self.target_mean

    def save(self, path: str | os.PathLike) -> Path:
        """`path` (.safetensors) + `path.json`; reload with `load_ratings(path)` or `make("ratings", path=...)`."""
        stats = {k: getattr(self, k) for k in ("feature_mean", "feature_std", "target_mean", "target_std")}
        return save_head(self.head, path, extra_tensors=stats,
                         extra_config={"kind": "ratings", "features": self.features.spec,
                                       "image_shape": list(self.features.image_shape), "report": self.report})

    def extra_repr(self) -> str:
        rho = self.report.get("spearman_holdout")
        fitted = f", spearman_holdout={rho:.3f}" if rho is not None else ""
        return f"{super().extra_repr()}, features={self.features.spec!r}{fitted}"


def load_ratings(path: str | os.PathLike, differentiable: bool = False) -> RatingsReward:
    head, tensors, config = load_head(path)
    if config.get("kind") != "ratings":
        raise ValueError(f"{path} is not a ratings reward (its JSON config has kind={config.get('kind')!r}); "
                         f"write one with RatingsReward.save or `python -m retrain.ratings_demo`")
    features = Features(config["features"], tuple(config["image_shape"]))
    return RatingsReward(features, head, tensors, config.get("report"), differentiable=differentiable)


@register("ratings")
def ratings(path, differentiable: bool = False) -> RatingsReward:
    """A ratings reward saved by `RatingsReward.save`, e.g. `make("ratings", path="runs/ratings/head.safetensors")`."""
    return load_ratings(path, differentiable=differentiable)


# ------------------------------------------------------------------ data


def load_ratings_csv(path: str | os.PathLike, image_column: str = "image", score_column: str = "score",
                     mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, C, H, W] in [0, 1], scores [N] float32) from a CSV of image paths and scores.

    Image paths are relative to the CSV's folder (or absolute); all images must have one size. `mode`
    is a PIL mode ("L" grey, "RGB"); by default "L" if every image is grey, else "RGB".
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ratings CSV {str(path)!r} does not exist")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {image_column, score_column} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"ratings CSV {path} lacks column(s) {sorted(missing)}; it has {reader.fieldnames}, "
                             f"expected a header with {image_column!r} and {score_column!r}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"ratings CSV {path} has no rows")
    pictures, scores = [], []
    for line, row in enumerate(rows, start=2):
        file = Path(row[image_column])
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise FileNotFoundError(f"ratings CSV {path}, line {line}: image {str(file)!r} does not exist")
        try:
            score = float(row[score_column])
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise ValueError(f"ratings CSV {path}, line {line}: score {row[score_column]!r} is not a finite number")
        pictures.append(Image.open(file))
        scores.append(score)
    mode = mode or ("L" if all(p.mode in ("L", "1", "I;16") for p in pictures) else "RGB")
    arrays = [np.asarray(p.convert(mode), dtype=np.float32) / 255.0 for p in pictures]
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) > 1:
        raise ValueError(f"ratings CSV {path}: images have different sizes {sizes[:3]}; resize them to one size")
    images = torch.from_numpy(np.stack(arrays))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.tensor(scores, dtype=torch.float32)


# ------------------------------------------------------------------ fitting


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.detach().cpu().numpy(), b.detach().cpu().numpy()).statistic)


def _ridge(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """argmin_w ‖x w − y‖² + α ‖w‖² for centred x [N, D], y [N] (float64 normal equations)."""
    x, y = x.double(), y.double()
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(x.T @ x + alpha * eye, x.T @ y).float()


def _choose_alpha(x: torch.Tensor, y: torch.Tensor, folds: int, generator: torch.Generator) -> float:
    """The ridge α with the least k-fold validation error on the training rows."""
    fold = torch.randperm(len(x), generator=generator) % folds
    errors = []
    for alpha in RIDGE_ALPHAS:
        err = 0.0
        for k in range(folds):
            w = _ridge(x[fold != k], y[fold != k], alpha)
            err += float(((x[fold == k] @ w - y[fold == k]) ** 2).sum())
        errors.append(err)
    return RIDGE_ALPHAS[int(np.argmin(errors))]


def _fit_mlp(x, y, hidden, epochs, lr, weight_decay, generator) -> MLPHead:
    torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
    head = MLPHead(x.shape[1], hidden=hidden, dropout=[0.1] * len(hidden), activation="gelu")
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    for _ in range(epochs):  # full-batch: rating sets are small
        loss = F.mse_loss(head(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


@torch.no_grad()
def _features(extractor: Features, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([extractor(chunk) for chunk in images.split(batch_size)]).float()


def fit_ratings(images: torch.Tensor, scores, features: str = "pixels", head: str = "ridge", *,
                alpha: float | None = None, hidden=(64,), epochs: int = 500, lr: float = 3e-3,
                weight_decay: float = 1e-2, holdout: float = 0.2, seed: int = 0) -> tuple[RatingsReward, dict]:
    """Fit a ratings reward; returns it and a report (held-out Spearman/Pearson/RMSE, sizes, α).

    images [N, C, H, W] in [0, 1]; scores [N]. `head="ridge"` (α by 5-fold CV unless given) or `"mlp"`.
    The rows in the held-out split are never fitted on; the returned reward is the one evaluated.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a tensor [N, C, H, W] in [0, 1], got {getattr(images, 'shape', images)}")
    y = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    if y.shape != (len(images),) or not torch.isfinite(y).all():
        raise ValueError(f"scores must be {len(images)} finite numbers, got shape {tuple(y.shape)}")
    if not 0 < holdout < 1 or len(images) * holdout < 5:
        raise ValueError(f"holdout={holdout} must be in (0, 1) and leave >= 5 held-out rows of {len(images)}")
    generator = torch.Generator().manual_seed(seed)
    extractor = Features(features, tuple(images.shape[1:]))
    phi = _features(extractor, images.float())
    order = torch.randperm(len(images), generator=generator)
    n_test = int(round(holdout * len(images)))
    test, train = order[:n_test], order[n_test:]
    std = phi[train].std(0)
    # (near-)constant features (e.g. digit corners that are never inked) get std = inf, i.e. are ignored:
    # standardising them by a tiny std would turn one stray value at test time into a huge input
    std = torch.where(std > DEAD_FEATURE * std.mean(), std, torch.full_like(std, math.inf))
    stats = {"feature_mean": phi[train].mean(0), "feature_std": std,
             "target_mean": y[train].mean(), "target_std": y[train].std().clamp(min=1e-6)}
    x = (phi - stats["feature_mean"]) / stats["feature_std"]
    t = (y - stats["target_mean"]) / stats["target_std"]
    report: dict = {"head": head, "features": features, "n_train": len(train), "n_holdout": n_test}
    if head == "ridge":
        alpha = alpha if alpha is not None else _choose_alpha(x[train], t[train], 5, generator)
        w = _ridge(x[train], t[train], alpha)
        model = MLPHead(x.shape[1])
        with torch.no_grad():
            model.layers[0].weight.copy_(w[None])
            model.layers[0].bias.zero_()
        report["alpha"] = alpha
    else:
        model = _fit_mlp(x[train], t[train], tuple(hidden), epochs, lr, weight_decay, generator)
    reward = RatingsReward(extractor, model, stats)
    with torch.no_grad():
        pred = reward(images[test].float(), torch.zeros(n_test, dtype=torch.long))
    report.update(spearman_holdout=spearman(pred, y[test]),
                  pearson_holdout=float(torch.corrcoef(torch.stack([pred, y[test]]))[0, 1]),
                  rmse_holdout=float((pred - y[test]).pow(2).mean().sqrt()))
    reward.report = report
    return reward, report
