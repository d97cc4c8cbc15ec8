"""Image grids for quick looks at samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor, nrow: int | None = None, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile images [N, C, H, W] in [0, 1] into one uint8 array [rows·H', cols·W', 3] (nearest upscaling)."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    n, _, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.ones(3, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 4,
              captions: list[str] | None = None, caption_width: int = 20) -> Path:
    """Write a PNG grid of images [N, C, H, W] in [0, 1]; `captions` (one per image) are printed under each image,
    wrapped at `caption_width` characters."""
    from PIL import Image, ImageDraw, ImageFont

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if captions is None:
        Image.fromarray(image_grid(images, nrow=nrow, scale=scale)).save(path)
        return path
    if len(captions) != len(images):
        raise ValueError(f"got {len(captions)} captions for {len(images)} images; expected one per image")
    import textwrap

    font = ImageFont.load_default()
    lines = [textwrap.wrap(c, caption_width) or [""] for c in captions]
    line_h, pad = 11, 2
    h, w = images.shape[2] * scale, images.shape[3] * scale
    cell_w = max(w, 6 * caption_width) + 3 * pad  # a white gutter between tiles
    cell_h = h + pad + line_h * max(len(x) for x in lines) + pad
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    ncol = math.ceil(len(images) / nrow)
    canvas = Image.new("RGB", (nrow * cell_w, ncol * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    tiles = image_grid(images, nrow=1, scale=scale, pad=0).reshape(len(images), h, w, 3)
    for i, (tile, text) in enumerate(zip(tiles, lines)):
        r, c = divmod(i, nrow)
        x0, y0 = c * cell_w, r * cell_h
        canvas.paste(Image.fromarray(tile), (x0 + (cell_w - w) // 2, y0))
        for j, line in enumerate(text):
            draw.text((x0 + pad, y0 + h + pad + j * line_h), line, fill="black", font=font)
    canvas.save(path)
    return path
