"""Image grids: `image_grid` tiles pixels; `grid_figure` / `save_grid` draw a legible picture with text."""

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


#: figures are drawn for this width (px): shown at it, as on a laptop screen or GitHub's README column, no text
#: is scaled down (matplotlib figures: `FIGURE_INCHES` at `FIGURE_DPI`)
FIGURE_WIDTH = 1200
FIGURE_INCHES = 12.0
FIGURE_DPI = FIGURE_WIDTH / FIGURE_INCHES
#: the smallest text a figure may show, in px at FIGURE_WIDTH (grids: captions are drawn at FONT_PX)
MIN_TEXT_PX = 10
FONT_PX = 16


def _font(size: int = FONT_PX):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's embedded scalable font (FreeType)


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` broken at spaces (and at explicit newlines) into lines at most `width` px wide."""
    lines = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if line and font.getlength(trial) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def grid_figure(images: torch.Tensor, ncol: int | None = None, captions: list[str] | None = None,
                col_labels: list[str] | None = None, row_labels: list[str] | None = None,
                title: str | None = None, width: int = FIGURE_WIDTH) -> np.ndarray:
    """A legible picture of images [N, C, H, W] in [0, 1], row-major in `ncol` columns: uint8 [H', W', 3], at
    least `width` px wide, every tile upscaled to fill it, text at `FONT_PX`. Optional text: a caption under
    each image, a header over each column (e.g. its prompt), a label left of each row, a title line on top."""
    from PIL import Image, ImageDraw

    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    n = len(images)
    ncol = min(ncol or math.ceil(math.sqrt(n)), n)
    nrow = math.ceil(n / ncol)
    for name, texts, count in (("captions", captions, n), ("col_labels", col_labels, ncol),
                               ("row_labels", row_labels, nrow)):
        if texts is not None and len(texts) != count:
            raise ValueError(f"got {len(texts)} {name}; expected {count}")
    font, gap = _font(), 8
    line_h = FONT_PX + 4
    label_w = 0
    if row_labels:
        label_w = min(width // 7, max(int(font.getlength(t)) for t in row_labels)) + 2 * gap
    tile_w = max(images.shape[3], math.ceil((width - label_w - gap * (ncol + 1)) / ncol))
    tile_h = round(tile_w * images.shape[2] / images.shape[3])
    text_w = tile_w

    def wrapped(texts):
        return [_wrap(t, font, text_w) for t in texts] if texts is not None else None

    cap_lines, head_lines = wrapped(captions), wrapped(col_labels)
    row_lines = [_wrap(t, font, label_w - gap) for t in row_labels] if row_labels else None
    title_lines = _wrap(title, font, width - 2 * gap) if title else []
    title_h = len(title_lines) * line_h + (gap if title else 0)
    header_h = title_h + ((max(len(x) for x in head_lines) * line_h + gap) if head_lines else 0)
    cap_h = [max((len(cap_lines[i]) for i in range(r * ncol, min(n, (r + 1) * ncol))), default=0) * line_h
             if cap_lines else 0 for r in range(nrow)]
    row_h = [tile_h + c + gap for c in cap_h]
    canvas = Image.new("RGB", (label_w + gap + ncol * (tile_w + gap), gap + header_h + sum(row_h)), "white")
    draw = ImageDraw.Draw(canvas)
    x = images.detach().float().clamp(0, 1).cpu()
    x = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).permute(0, 2, 3, 1).mul(255).round().byte().numpy()
    resample = Image.NEAREST if images.shape[3] <= 64 else Image.LANCZOS  # pixels stay pixels on tiny images
    for k, line in enumerate(title_lines):
        draw.text((gap, gap + k * line_h), line, fill="black", font=font)
    for j, lines in enumerate(head_lines or []):
        x0 = label_w + gap + j * (tile_w + gap)
        for k, line in enumerate(lines):
            draw.text((x0, gap + title_h + k * line_h), line, fill="black", font=font)
    y0 = gap + header_h
    for r in range(nrow):
        for k, line in enumerate(row_lines[r] if row_lines else []):
            draw.text((gap, y0 + tile_h // 2 - len(row_lines[r]) * line_h // 2 + k * line_h), line, fill="black",
                      font=font)
        for c in range(ncol):
            i = r * ncol + c
            if i >= n:
                break
            x0 = label_w + gap + c * (tile_w + gap)
            canvas.paste(Image.fromarray(x[i]).resize((tile_w, tile_h), resample), (x0, y0))
            for k, line in enumerate(cap_lines[i] if cap_lines else []):
                draw.text((x0, y0 + tile_h + 2 + k * line_h), line, fill="black", font=font)
        y0 += row_h[r]
    return np.asarray(canvas)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
              captions: list[str] | None = None) -> Path:
    """Write `grid_figure` of images [N, C, H, W] in [0, 1] as a PNG: `nrow` images per row, `captions` (one per
    image, e.g. prompts) under them."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_figure(images, ncol=nrow, captions=captions)).save(path)
    return path
