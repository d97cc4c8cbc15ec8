"""`digit_judge_indep`: a digits judge independent of the reward in data, model family and feature space.

`digit_classifier` (the reward, a CNN) and `digit_judge` (an MLP) both learn from the *train* split of
`diffenv.data` with the same light augmentation, and the embedded diffusion models learn from it too. An agent
that finds what those two share (the same 1,293 images, the same pixel inputs) can fool both. This judge shares
none of it:

| | reward / `digit_judge` | `digit_judge_indep` |
|---|---|---|
| data | train split (1,437) | **test split (360)** only; the train split is its held-out data |
| augmentation | ±1-pixel shifts, pixel noise | rotation ±15°, scale 0.85–1.15, shear, sub-pixel shifts, elastic warp, stroke thickening / thinning, blur, gamma, noise |
| family | CNN / MLP on pixels | product of two experts: an MLP on a fixed **gradient-orientation descriptor** (HOG-like, no pixel input) and a non-parametric **soft nearest-prototype** classifier on blurred pixels |
| FD features | `digit_judge`'s 96-d penultimate layer | the orientation MLP's 64-d penultimate layer (`features`) |

The ensemble's logits are the mean of the two experts' log-probabilities (a product of experts: an image must
satisfy both the stroke-direction model and the template matcher), divided by a temperature fitted on a
calibration slice of the train split; accuracy, NLL and ECE before/after calibration on the rest of the train
split are in `rewards/weights/digit_judge_indep_metrics.json` (docs/design.md §6). Everything is deterministic
(no dropout, fixed buffers); weights ship as safetensors + json and are rebuilt by
`python -m retrain.train_independent_judge`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from rewards.classifier import ARCHITECTURES, NUM_CLASSES, ClassifierReward, load_classifier
from rewards.registry import register

NAME = "digit_judge_indep"
ORIENTATIONS = 8  # signed gradient directions, 45° apart
DESCRIPTOR_DIM = ORIENTATIONS * 9 + 16  # 3×3 overlapping cells × 8 orientations + a 4×4 intensity thumbnail


def orientation_descriptor(images: torch.Tensor) -> torch.Tensor:
    """[B, 88] HOG-like descriptor of images [B, 1, 8, 8] in [0, 1]: Sobel gradients soft-binned into 8 signed
    directions (weight |g| cos²(θ − θ_b) on the half-plane of θ_b, smooth in the pixels), averaged over 3×3
    overlapping 4×4-pixel cells, plus the 2×2-average-pooled image (coarse ink layout)."""
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device) / 4
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]  # [2, 1, 3, 3]
    grad = F.conv2d(images, kernels, padding=1)  # [B, 2, 8, 8]; zero padding = background
    magnitude = grad.pow(2).sum(1, keepdim=True).add(1e-6).sqrt()  # [B, 1, 8, 8]
    angles = torch.arange(ORIENTATIONS, device=images.device) * (2 * math.pi / ORIENTATIONS)
    directions = torch.stack([angles.cos(), angles.sin()], 1)  # [8, 2]
    projection = torch.einsum("bchw,oc->bohw", grad, directions)  # |g| cos(θ − θ_b)
    binned = projection.clamp(min=0).pow(2) / magnitude  # [B, 8, 8, 8] = |g| cos²(θ − θ_b)⁺
    cells = F.avg_pool2d(binned, kernel_size=4, stride=2)  # [B, 8, 3, 3]
    thumbnail = F.avg_pool2d(images, 2)  # [B, 1, 4, 4]
    return torch.cat([4 * cells.flatten(1), thumbnail.flatten(1)], 1)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable 3×3 Gaussian blur with zero (background) padding, [B, 1, H, W]."""
    taps = torch.tensor([-1.0, 0.0, 1.0], device=images.device)
    kernel = torch.exp(-taps**2 / (2 * sigma**2))
    kernel = torch.outer(kernel, kernel) / kernel.sum() ** 2
    return F.conv2d(images, kernel[None, None].to(images.dtype), padding=1)


class IndependentDigitJudge(nn.Module):
    """Product of two experts (module docstring): `forward` gives ensemble logits [B, 10] for images in [0, 1];
    `features` the 64-d space the independent FD is measured in."""

    def __init__(self, hidden: tuple[int, int] = (128, 64), n_prototypes: int = 2160, blur_sigma: float = 0.8):
        super().__init__()
        self.blur_sigma = float(blur_sigma)
        self.body = nn.Sequential(nn.LayerNorm(DESCRIPTOR_DIM), nn.Linear(DESCRIPTOR_DIM, hidden[0]), nn.GELU(),
                                  nn.Linear(hidden[0], hidden[1]), nn.GELU())
        self.head = nn.Linear(hidden[1], NUM_CLASSES)
        # the prototype expert's memory: blurred training views, their labels and the kernel width (set by training)
        self.register_buffer("prototypes", torch.zeros(n_prototypes, 64))  # [P, 64]
        self.register_buffer("prototype_labels", torch.zeros(n_prototypes, dtype=torch.long))  # [P]
        self.register_buffer("bandwidth", torch.ones(()))  # τ in exp(−‖x − p‖² / τ)

    def features(self, images: torch.Tensor) -> torch.Tensor:  # [B, 1, 8, 8] -> [B, 64]
        return self.body(orientation_descriptor(images))

    def mlp_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def prototype_logits(self, images: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """log Σ_{p in class k} exp(−‖blur(x) − p‖² / τ) − log n_k: a soft nearest-prototype vote, [B, 10].
        `exclude` [B, P] (bool) drops prototypes per image (leave-one-out while fitting τ)."""
        query = gaussian_blur(images, self.blur_sigma).flatten(1)  # [B, 64]
        scores = -torch.cdist(query, self.prototypes).pow(2) / self.bandwidth  # [B, P]
        if exclude is not None:
            scores = scores.masked_fill(exclude, -math.inf)
        # per class, not a [B, P, 10] masked tensor: 1,000 images would cost 20x more
        members = [(self.prototype_labels == k).nonzero().squeeze(1) for k in range(NUM_CLASSES)]
        return torch.stack([scores[:, m].logsumexp(1) - math.log(len(m)) for m in members], 1)  # [B, 10]

    def forward(self, images: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        return 0.5 * (F.log_softmax(self.mlp_logits(images), 1)
                      + F.log_softmax(self.prototype_logits(images, exclude), 1))


ARCHITECTURES["IndependentDigitJudge"] = IndependentDigitJudge  # so `load_classifier` can build it


@register(NAME)
def digit_judge_indep(mode: str = "prob", weights_dir: str | Path | None = None) -> ClassifierReward:
    """The independent judge (evaluation only, never a training reward): trained on the test split with strong
    augmentations, an orientation-descriptor MLP × soft nearest-prototype ensemble, temperature-calibrated."""
    return load_classifier(NAME, mode=mode, weights_dir=weights_dir)
