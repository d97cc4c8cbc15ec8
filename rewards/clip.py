"""CLIP-based rewards via transformers: CLIP score, a LAION-style aesthetic predictor, PickScore-style preference.

| name | reward | needs |
|---|---|---|
| `clip_score` | `scale · cos(E_img(x), E_txt(prompt_c))` (Hessel et al. 2021 use scale 2.5 and clip at 0) | `path`, `prompts` |
| `aesthetic` | `MLP(E_img(x) / ‖E_img(x)‖)`, LAION aesthetic predictor v2 layout (`rewards.heads`) | `path`, `head` |
| `pickscore` | `exp(logit_scale) · cos(E_img(x), E_txt(prompt_c))` (Kirstain et al. 2023) | `path`, `prompts` |

`path` is a local folder or hub id of a transformers `CLIPModel` (model_type "clip"), loaded with
`use_safetensors=True` and never with remote code; a missing path or another architecture is a clear
error. `prompts` is the backend's prompt set (condition id c = prompt c), embedded once.

Images `[B, C, H, W]` in [0, 1] are preprocessed **in torch** with the checkpoint's processor statistics
(shortest-edge bicubic resize with antialiasing, centre crop, mean/std normalisation; grey images are
repeated to RGB), so the reward is differentiable when built with `differentiable=True` (and called with
grad enabled). By default it runs under `no_grad`. `batch_size` bounds the CLIP batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from rewards.base import Reward
from rewards.registry import register

#: OpenAI CLIP's normalisation, used when a checkpoint ships no preprocessor_config.json
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {None: torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _check_source(path: str) -> None:
    folder = Path(path).expanduser()
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"CLIP model {path!r}: {folder / 'config.json'} is missing; expected a "
                                    f"transformers CLIPModel folder (save_pretrained)")
        return
    if str(path).startswith(("/", ".", "~")) or str(path).count("/") != 1:
        raise FileNotFoundError(f"CLIP model {path!r}: no such folder (and not a hub id of the form 'org/name')")


def prompt_list(prompts: str | os.PathLike | Sequence[str]) -> list[str]:
    """The prompt set as a list: a list of strings, or a text file read exactly like the backends read it
    (`diffenv.models.prompts`: one per line, blank and `#` lines skipped, stripped), so that condition id c
    is the same prompt for the model and the reward (tests/test_reward_models.py checks they agree).
    Kept here because `rewards` does not import `diffenv`."""
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts \
            or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty strings or a prompt file, got {prompts!r}")
    return [p.strip() for p in prompts]


class CLIPEncoder(nn.Module):
    """A frozen `CLIPModel` with in-torch preprocessing: `image_embeds` / `text_embeds` -> [B, D] (unit norm)."""

    def __init__(self, path: str | os.PathLike, processor_path: str | os.PathLike | None = None,
                 torch_dtype: str | None = None, batch_size: int = 64):
        super().__init__()
        from transformers import AutoConfig, CLIPModel, CLIPTokenizer

        path = str(path)
        _check_source(path)
        if torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {sorted(k for k in DTYPES if k)} or None, "
                             f"got {torch_dtype!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"CLIP model {path!r}: cannot read its config: {e}") from e
        if config.model_type != "clip":
            raise ValueError(f"CLIP model {path!r} is a {config.model_type!r} model "
                             f"({', '.join(config.architectures or [])}); expected a CLIPModel (model_type 'clip')")
        self.model = CLIPModel.from_pretrained(path, use_safetensors=True, dtype=DTYPES[torch_dtype]).eval()
        self.model.requires_grad_(False)
        processor_path = str(processor_path or path)
        self.tokenizer = CLIPTokenizer.from_pretrained(processor_path)
        stats = _processor_stats(processor_path, config.vision_config.image_size)
        self.resize, self.crop = stats["resize"], stats["crop"]
        self.register_buffer("mean", torch.tensor(stats["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(stats["std"]).view(1, 3, 1, 1), persistent=False)
        self.batch_size = batch_size
        self.dim = int(config.projection_dim)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1 or 3, H, W] in [0, 1] -> CLIP pixel values [B, 3, crop_h, crop_w] (differentiable)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"CLIP rewards need 1- or 3-channel images, got C={images.shape[1]}")
        h, w = images.shape[-2:]
        scale = self.resize / min(h, w)
        size = (max(self.crop[0], round(h * scale)), max(self.crop[1], round(w * scale)))
        x = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        return (x - self.mean) / self.std

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm projected image embeddings [B, D] in float32."""
        out = []
        dtype = self.model.dtype
        for chunk in images.split(self.batch_size):
            pixels = self.preprocess(chunk).to(dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm projected text embeddings [N, D] in float32."""
        max_len = self.model.config.text_config.max_position_embeddings
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=max_len, return_tensors="pt").to(self.mean.device)
            pooled = self.model.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
            out.append(self.model.text_projection(pooled).float())
        return F.normalize(torch.cat(out), dim=-1)


def _processor_stats(path: str, image_size: int) -> dict:
    """Resize/crop sizes and normalisation of a CLIP checkpoint's preprocessor_config.json."""
    from transformers.utils import cached_file

    file = cached_file(path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    cfg = json.loads(Path(file).read_text()) if file else {}
    size, crop = cfg.get("size", image_size), cfg.get("crop_size", image_size)
    resize = size.get("shortest_edge", min(size.get("height", image_size), size.get("width", image_size))) \
        if isinstance(size, dict) else int(size)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
    return {"resize": int(resize), "crop": crop, "mean": cfg.get("image_mean", OPENAI_MEAN),
            "std": cfg.get("image_std", OPENAI_STD)}


class CLIPSimilarityReward(Reward):
    """`scale · cos(image, prompt_c)`; `scale="logit_scale"` uses the model's learned temperature (PickScore)."""

    def __init__(self, path, prompts: Sequence[str], scale: float | str = 1.0, name: str = "clip_score",
                 differentiable: bool = False, processor_path=None, torch_dtype: str | None = None,
                 batch_size: int = 64):
        super().__init__()
        self.name, self.differentiable = name, bool(differentiable)
        self.encoder = CLIPEncoder(path, processor_path, torch_dtype, batch_size)
        self.prompts = prompt_list(prompts)
        if scale == "logit_scale":
            scale = float(self.encoder.model.logit_scale.exp())
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"reward {name!r}: scale must be a number or 'logit_scale', got {scale!r}")
        self.scale = float(scale)
        self.register_buffer("text", self.encoder.text_embeds(self.prompts))  # [N, D]

    def score(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        conditions = self.check_condition_ids(conditions, len(self.prompts), "prompt ids")
        return self.scale * (self.encoder.image_embeds(images) * self.text[conditions]).sum(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prompts={len(self.prompts)}, scale={self.scale:g}"


class AestheticReward(Reward):
    """A LAION-style aesthetic score: an MLP head (safetensors) on unit-norm CLIP image embeddings."""

    def __init__(self, path, head, name: str = "aesthetic", differentiable: bool = False, processor_path=None,
                 torch_dtype: str | None = None, batch_size: int = 64):
        super().__init__()
        from rewards.heads import load_head

        self.name, self.differentiable = name, bool(differentiable)
        self.encoder = CLIPEncoder(path, processor_path, torch_dtype, batch_size)
        self.head = load_head(head, expected_in_dim=self.encoder.dim)[0].requires_grad_(False)

    def score(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.image_embeds(images))


@register("clip_score")
def clip_score(path, prompts, scale: float = 1.0, differentiable: bool = False, **kwargs) -> CLIPSimilarityReward:
    """Prompt-image CLIP cosine similarity × `scale`, e.g. `make("clip_score", path=..., prompts=...)`."""
    return CLIPSimilarityReward(path, prompts, scale=scale, name="clip_score", differentiable=differentiable, **kwargs)


@register("pickscore")
def pickscore(path, prompts, processor_path=None, differentiable: bool = False, **kwargs) -> CLIPSimilarityReward:
    """PickScore-style preference: `exp(logit_scale) · cos`. For PickScore_v1 pass
    `processor_path` = the CLIP-H processor it was trained with (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
    return CLIPSimilarityReward(path, prompts, scale="logit_scale", name="pickscore", differentiable=differentiable,
                                processor_path=processor_path, **kwargs)


@register("aesthetic")
def aesthetic(path, head=None, differentiable: bool = False, **kwargs) -> AestheticReward:
    """LAION aesthetic predictor: CLIP at `path` (v2: openai/clip-vit-large-patch14) + MLP `head`
    (safetensors; default `<path>/aesthetic_head.safetensors`)."""
    head = head if head is not None else Path(path) / "aesthetic_head.safetensors"
    return AestheticReward(path, head, differentiable=differentiable, **kwargs)
