"""Digit classifiers: the reward model `digit_classifier` (a CNN) and the held-out judge `digit_judge` (an MLP).

Both classify 8×8 digits in [0, 1] and score an image by how well it shows its condition `c`:

| mode | reward | differentiable |
|---|---|---|
| `"prob"` (default) | `p(c | x)` | yes |
| `"log_prob"` | `log p(c | x)` | yes |
| `"correct"` | `1[argmax_k p(k | x) = c]` | no |

The judge has a different architecture and its own training run (same train split, different
seed stream), so an agent that exploits the reward CNN's blind spots is not also graded by it
(docs/design.md §6). Probabilities are temperature-scaled on a calibration slice of the train split, so
`log_prob` is a calibrated log-likelihood. Weights ship as safetensors in `rewards/weights/` and are
rebuilt by `python -m retrain.train_classifiers`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from rewards.base import Reward
from rewards.registry import register

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
MODES = ("prob", "log_prob", "correct")
REGENERATE = "python -m retrain.train_classifiers --out rewards/weights"


class DigitCNN(nn.Module):
    """Three 3×3 conv layers (8×8 -> 4×4 -> 2×2) and a linear head. SiLU keeps pixel gradients smooth."""

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 64), hidden: int = 128):
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # 4×4
            nn.Conv2d(c2, c3, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # 2×2
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c3 * 4, hidden), nn.SiLU(), nn.Linear(hidden, NUM_CLASSES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, 1, 8, 8] in [0, 1] -> logits [B, 10]
        return self.head(self.features(images * 2.0 - 1.0))


class DigitMLP(nn.Module):
    """A fully connected net on the 64 flattened pixels: no convolution, no weight sharing with the CNN."""

    def __init__(self, hidden: tuple[int, ...] = (256, 96)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU()]
            width = h
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, 1, 8, 8] in [0, 1] -> logits [B, 10]
        return self.net(images * 2.0 - 1.0)


ARCHITECTURES = {"DigitCNN": DigitCNN, "DigitMLP": DigitMLP}


def build_network(config: dict) -> nn.Module:
    """Instantiate the (untrained) network a config describes."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config["kwargs"].items()}
    return ARCHITECTURES[config["architecture"]](**kwargs)


class ClassifierReward(Reward):
    """A frozen digit classifier as a reward; see the module docstring for the modes."""

    def __init__(self, network: nn.Module, name: str, mode: str = "prob", temperature: float = 1.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"reward {name!r}: mode must be one of {MODES}, got {mode!r}")
        if not temperature > 0:
            raise ValueError(f"reward {name!r}: temperature must be > 0, got {temperature!r}")
        self.network = network.eval().requires_grad_(False)
        self.name = name
        self.mode = mode
        self.temperature = float(temperature)
        self.differentiable = mode != "correct"

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated logits [B, 10] for images [B, 1, 8, 8] in [0, 1]; `log_softmax` gives log p(k | x)."""
        if not isinstance(images, torch.Tensor) or tuple(images.shape[1:]) != IMAGE_SHAPE:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"reward {self.name!r}: images must have shape [B, 1, 8, 8], got {shape}")
        return self.network(images.float()) / self.temperature

    def score(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        conditions = self.check_condition_ids(conditions, NUM_CLASSES, "class ids")
        logits = self.logits(images)  # [B, 10]
        if self.mode == "correct":
            return (logits.argmax(dim=1) == conditions).float()
        log_prob = F.log_softmax(logits, dim=1).gather(1, conditions[:, None]).squeeze(1)  # [B]
        return log_prob if self.mode == "log_prob" else log_prob.exp()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}, temperature={self.temperature:.3f}"


def load_classifier(
    name: str, mode: str = "prob", weights_dir: str | Path | None = None
) -> ClassifierReward:
    """Load `{weights_dir}/{name}.safetensors` and its `{name}.json` config as a `ClassifierReward` on CPU."""
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    weights, config_path = weights_dir / f"{name}.safetensors", weights_dir / f"{name}.json"
    missing = [str(p) for p in (weights, config_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"reward {name!r}: missing {', '.join(missing)}. Regenerate the classifier weights with "
            f"`{REGENERATE}` (from the repository root, ~1 min on CPU)."
        )
    config = json.loads(config_path.read_text())
    network = build_network(config)
    network.load_state_dict(load_file(str(weights), device="cpu"))
    return ClassifierReward(network, name=name, mode=mode, temperature=config.get("temperature", 1.0))


@register("digit_classifier")
def digit_classifier(mode: str = "prob", weights_dir: str | Path | None = None) -> ClassifierReward:
    """The reward model: a small CNN, `p(c | x)` by default (`mode="log_prob"` / `"correct"`)."""
    return load_classifier("digit_classifier", mode=mode, weights_dir=weights_dir)


@register("digit_judge")
def digit_judge(mode: str = "prob", weights_dir: str | Path | None = None) -> ClassifierReward:
    """The held-out judge: an MLP trained separately; never use it as the training reward."""
    return load_classifier("digit_judge", mode=mode, weights_dir=weights_dir)
