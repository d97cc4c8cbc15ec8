"""The embedded default models: class-conditional diffusers `UNet2DModel`s on 8×8 digits.

`digits-eps` predicts ε on a cosine DDPM schedule (the SD1.x family in miniature); `digits-flow`
predicts the rectified-flow velocity `v = ε − x0` (the SD3/Flux family in miniature). Both were
trained by `python -m retrain.train_digits` on scikit-learn's digits (train split) with 10 %
label dropout to the null class 10, so classifier-free guidance works. Pixel space: decode is the
map from [-1, 1] to [0, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from diffenv.data import to_unit
from diffenv.models.base import DiffusionBackend
from diffenv.paths import safe_name

WEIGHTS_DIR = Path(__file__).parent / "weights"
EMBEDDED_MODELS = ("digits-eps", "digits-flow")
BACKEND_FILE = "backend.json"


class EmbeddedDigitsBackend(DiffusionBackend):
    """A shipped digits model loaded from safetensors (no network access, no pickle)."""

    def __init__(self, name: str = "digits-eps", device: str | torch.device = "cpu", path: str | Path | None = None):
        from diffusers import UNet2DModel

        folder = Path(path) if path is not None else WEIGHTS_DIR / safe_name(name, "model")
        meta_file = folder / BACKEND_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"embedded model {name!r}: {meta_file} is missing; regenerate it with "
                f"`python -m retrain.train_digits --model {name}`"
            )
        meta = json.loads(meta_file.read_text())
        self.name = name
        self.family = meta["family"]
        self.prediction_type = meta["prediction_type"]
        self.condition_names = list(meta["condition_names"])
        self.scheduler_config = dict(meta["scheduler_config"])
        self.num_train_timesteps = int(self.scheduler_config["num_train_timesteps"])
        self.latent_shape = tuple(meta["latent_shape"])
        self._unet = UNet2DModel.from_pretrained(folder, use_safetensors=True).to(device).eval()
        self._unet.requires_grad_(False)

    @property
    def denoiser(self) -> nn.Module:
        return self._unet

    @property
    def device(self) -> torch.device:
        return next(self._unet.parameters()).device

    def forward_model(self, latents, timesteps, conditions):
        return self._unet(latents, timesteps, class_labels=conditions).sample.float()

    def decode(self, latents):
        return to_unit(latents)
