"""JPEG (in)compressibility, the DDPO toy rewards (Black et al. 2023, `ddpo_pytorch/rewards.py`).

Each image is quantised to uint8 (`round(255 x)`), encoded by PIL as JPEG at quality 95 and
measured in kB (bytes / 1000, DDPO's convention). `jpeg_compressibility = -size`,
`jpeg_incompressibility = +size`. Conditions are ignored. Not differentiable. On tiny images the
fixed JPEG header dominates the size, so only differences between images carry signal.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from rewards.base import Reward
from rewards.registry import register

QUALITY = 95


def jpeg_size_kb(images: torch.Tensor, quality: int = QUALITY) -> torch.Tensor:
    """JPEG size in kB of each image in `images [B, C, H, W]` in [0, 1], C in {1, 3}; returns float32 [B] on CPU."""
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"JPEG rewards need 1- or 3-channel images [B, C, H, W], got C={channels}")
    pixels = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:  # [H, W, C] uint8; PIL encodes one image at a time
        image = Image.fromarray(array[..., 0] if channels == 1 else array)  # mode "L" or "RGB"
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.from_numpy(np.asarray(sizes, dtype=np.float32))


class JpegReward(Reward):
    """`sign * size_kb`: sign -1 rewards compressible images, +1 incompressible ones."""

    differentiable = False

    def __init__(self, name: str, sign: float, quality: int = QUALITY):
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"reward {name!r}: JPEG quality must be in 1..100, got {quality!r}")
        self.name, self.sign, self.quality = name, float(sign), int(quality)

    def score(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        if images.shape[1] not in (1, 3):
            raise ValueError(f"reward {self.name!r}: images must have 1 or 3 channels, got C={images.shape[1]}")
        return self.sign * jpeg_size_kb(images, self.quality)


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = QUALITY) -> JpegReward:
    """Minus the JPEG size in kB: higher for smoother, simpler images."""
    return JpegReward("jpeg_compressibility", sign=-1.0, quality=quality)


@register("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = QUALITY) -> JpegReward:
    """The JPEG size in kB: higher for detailed, noisy images."""
    return JpegReward("jpeg_incompressibility", sign=+1.0, quality=quality)
