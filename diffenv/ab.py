"""`diffenv ab`: the base pipeline with CFG vs the guidance-free LoRA model, same prompts, same seeds.

    diffenv ab --model sd:/models/sd15 --lora runs/grpo/lora.safetensors --prompts prompts.txt \\
        --seeds 0 1 2 --num-steps 20 --guidance-scale 7.5 --reward clip_score:/models/clip-vit-b32

Both sides run the *plain* diffusers pipeline (nothing of this repo's sampler), so the comparison shows
what a user of the exported LoRA gets: side A is `pipe(prompt, guidance_scale=w)` on the base weights,
side B is `pipe.load_lora_weights(...)` (fused) then `pipe(prompt, guidance_scale=1)` (Flux: `true_cfg_scale`
against the empty negative prompt, the distilled guidance embedding untouched). Image i of both sides
starts from the same noise (`torch.Generator(device).manual_seed(seed)`). Writes a grid with a column per
prompt and, per seed, a row of each side, every image captioned with its rewards, NFE and time per image, and
prints mean rewards, NFE per image and wall time.

`--lora` takes a diffusers LoRA folder or file (`export_diffusers_lora`), or a LoRA file written by the
trainer (`lora.safetensors`), which is converted on the fly.
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

import rewards
from diffenv.models.lora import convert_lora_to_diffusers, is_trainer_lora
from diffenv.validation import DEVICE, SEED, bounds

#: the one-line summary `diffenv ab --help` shows
DESCRIPTION = __doc__.split("\n\n")[0]


@dataclass
class ABOptions:
    """`diffenv ab`'s options: `agents.cli` makes a flag of each field (type, range and help from here)."""

    model: str
    """sd:PATH, sdxl:PATH, sd3:PATH or flux:PATH (folder or hub id), or shapes (the embedded StableDiffusionPipeline)"""
    lora: str
    """diffusers LoRA folder/file, or a trainer lora.safetensors"""
    prompts: str | None = None
    """text file, one prompt per line (required, except for --model shapes: default 10 of its eval prompts, every
    kind, training and held-out compositions)"""
    seeds: list[int] = field(default_factory=lambda: [0], metadata=SEED)
    """one image per prompt and seed"""
    num_steps: int = field(default=20, metadata=bounds(ge=1))
    """sampler steps on both sides"""
    guidance_scale: float = field(default=5.0, metadata=bounds(ge=1))
    """CFG weight of the base side (LoRA side: 1)"""
    reward: list[str] = field(default_factory=list)
    """reward to report, NAME or NAME:PATH (e.g. clip_score:/models/clip); repeatable"""
    height: int | None = field(default=None, metadata=bounds(ge=1))
    """image height (default: the pipeline's)"""
    width: int | None = field(default=None, metadata=bounds(ge=1))
    """image width (default: the pipeline's)"""
    negative_prompt: str | None = None
    """the base side's negative prompt (default: none)"""
    torch_dtype: Literal["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"] | None = None
    """weights' dtype (default: float32)"""
    device: str = field(default="cpu", metadata=DEVICE)
    """torch device"""
    out: str = "runs/ab/grid.png"
    """PNG grid: columns prompts, rows base+CFG | LoRA per seed"""


def make_reward(spec: str, prompts: list[str], device):
    """`NAME` or `NAME:PATH`; rewards whose factory takes `prompts` get the prompt list."""
    name, _, path = spec.partition(":")
    params = inspect.signature(rewards.factory(name)).parameters  # an unknown name: the registry's error
    kwargs = {"path": path} if path else {}
    if "prompts" in params:
        kwargs["prompts"] = prompts
    return rewards.make(name, device=device, **kwargs)


def _load_lora(pipe, lora: str) -> None:
    path = Path(lora)
    if path.is_dir():
        pipe.load_lora_weights(str(path))
        return
    if not path.is_file():
        raise FileNotFoundError(f"--lora {lora}: no such file or folder")
    if not is_trainer_lora(path):  # already diffusers' format
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        convert_lora_to_diffusers(path, tmp, type(pipe).__name__)
        pipe.load_lora_weights(tmp)


def _sample(pipe, kind: str, prompts: list[str], seeds: list[int], guidance: float, a) -> tuple[torch.Tensor, float]:
    """Images [len(seeds) * len(prompts), 3, H, W] in [0, 1] (seed-major) and the wall time."""
    kwargs = dict(num_inference_steps=a.num_steps, output_type="pt", height=a.height, width=a.width)
    if kind == "flux":
        cfg = guidance > 1
        kwargs.update(true_cfg_scale=guidance, negative_prompt=(a.negative_prompt or "") if cfg else None)
    else:
        kwargs.update(guidance_scale=guidance, negative_prompt=a.negative_prompt if guidance > 1 else None)
    images, start = [], time.perf_counter()
    for seed in tqdm(seeds, desc=f"w={guidance:g}", unit="seed", disable=len(seeds) < 2):
        generators = [torch.Generator(a.device).manual_seed(seed) for _ in prompts]
        with torch.no_grad():
            images.append(pipe(prompt=prompts, generator=generators, **kwargs).images.float().cpu())
    return torch.cat(images), time.perf_counter() - start


def cmd_ab(a: argparse.Namespace) -> int:
    from diffenv.models.diffusers_backend import load_pipeline, parse_model_spec, resolve_dtype
    from diffenv.models.prompts import load_prompts

    model, prompts = a.model, None
    if model == "shapes":  # the embedded pipeline folder, a plain StableDiffusionPipeline
        from diffenv.models.shapes import SHAPES_DIR
        from rewards.shapes_task import eval_prompts

        model, prompts = f"sd:{SHAPES_DIR}", eval_prompts()[::5]
    elif a.prompts is None:
        raise ValueError(f"--prompts is required for --model {a.model} (a text file, one prompt per line)")
    kind, path, _ = parse_model_spec(model)
    if a.num_steps < 1 or not a.guidance_scale >= 1:
        raise ValueError(f"expected --num-steps >= 1 and --guidance-scale >= 1, got {a.num_steps}, {a.guidance_scale}")
    if not Path(a.lora).exists():  # fail before the (long) base-side sampling
        raise FileNotFoundError(f"--lora {a.lora}: no such file or folder")
    prompts = load_prompts(a.prompts) if a.prompts is not None else prompts
    reward_fns = [make_reward(spec, prompts, a.device) for spec in a.reward]
    pipe = load_pipeline(kind, path, torch_dtype=resolve_dtype(a.torch_dtype)).to(a.device)
    pipe.set_progress_bar_config(disable=True)

    base, base_time = _sample(pipe, kind, prompts, a.seeds, a.guidance_scale, a)
    _load_lora(pipe, a.lora)  # `diffenv.quiet` (installed by `import diffenv`) drops diffusers' expected "no text-encoder keys"
    pipe.fuse_lora()  # time the model as it would be deployed: no per-layer adapter overhead
    tuned, tuned_time = _sample(pipe, kind, prompts, a.seeds, 1.0, a)

    n = len(base)
    conditions = torch.arange(len(prompts)).repeat(len(a.seeds)).to(a.device)
    cfg_nfe = 2 if a.guidance_scale > 1 else 1
    sides = [(f"base+CFG(w={a.guidance_scale:g})", base, cfg_nfe * a.num_steps, base_time),
             ("LoRA(w=1)", tuned, a.num_steps, tuned_time)]
    scores = [[f(images.to(a.device), conditions).float().cpu() for f in reward_fns] for _, images, _, _ in sides]
    out = save_ab_figure(a, prompts, sides, scores)
    names = [r.name for r in reward_fns]
    print(f"model={a.model} lora={a.lora} prompts={len(prompts)} seeds={a.seeds} steps={a.num_steps}")
    print(f"{'side':<22}{'NFE/image':>10}{'s/image':>10}" + "".join(f"{m:>22}" for m in names))
    for (label, _, nfe, wall), side_scores in zip(sides, scores):
        print(f"{label:<22}{nfe:>10d}{wall / n:>10.3f}" + "".join(f"{s.mean().item():>22.4f}" for s in side_scores))
    print(f"wrote {out} (columns: prompts; rows: base+CFG and LoRA for each seed)")
    return 0


def save_ab_figure(a, prompts: list[str], sides: list[tuple], scores: list[list[torch.Tensor]]) -> Path:
    """The A/B grid: a column per prompt, for each seed a row of the base with CFG and one of the LoRA; under
    each image its rewards, NFE and seconds per image. `sides`: (label, images [S·P, 3, H, W] seed-major, NFE per
    image, wall time); `scores[side][reward]`: [S·P]."""
    from PIL import Image

    from diffenv.viz import grid_figure

    p, rows, captions, labels = len(prompts), [], [], []
    for i, seed in enumerate(a.seeds):
        for (label, images, nfe, wall), side_scores in zip(sides, scores):
            rows.append(images[i * p:(i + 1) * p])
            labels.append(f"{label.replace('(', ' (')}, seed {seed}")
            per_image = wall / len(images)
            for j in range(i * p, (i + 1) * p):
                values = " / ".join(f"{s[j].item():.2f}" for s in side_scores)
                captions.append((values + "\n" if values else "") + f"{nfe} NFE · {1e3 * per_image:.0f} ms")
    title = (f"{a.model}, {a.num_steps} steps, LoRA {Path(a.lora).name}; under each image: "
             + (" / ".join(f.partition(':')[0] for f in a.reward) + ", " if a.reward else "")
             + "NFE and time per image")
    figure = grid_figure(torch.cat(rows), ncol=p, captions=captions, col_labels=prompts, row_labels=labels,
                         title=title)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(figure).save(out)
    return out
