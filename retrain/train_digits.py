"""Train the embedded class-conditional digits models (seeded, CPU; wall time: README, Embedded models).

    python -m retrain.train_digits --model digits-eps
    python -m retrain.train_digits --model digits-flow

Both are diffusers `UNet2DModel`s (~0.7 M parameters) on scikit-learn's 8×8 digits, *train split
only*, pixels in [-1, 1]. Labels are dropped to the null class (id 10) with probability
`label_dropout`, so one network gives both branches of classifier-free guidance.

- `digits-eps`: DDPM objective (Ho et al. 2020, eq. 14), ε-prediction, cosine schedule, T = 1000.
- `digits-flow`: rectified flow / conditional flow matching (Liu et al. 2022; Lipman et al. 2022):
  `x_t = (1 − t) x0 + t ε`, target `v = ε − x0`, t ~ U(0, 1), network timestep `1000 t`.

The exponential moving average of the weights is what gets saved (safetensors + config).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from diffenv.data import IMAGE_SHAPE, NUM_CLASSES, load_digits_split
from diffenv.models.embedded import BACKEND_FILE, EMBEDDED_MODELS, WEIGHTS_DIR

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=16,
    num_class_embeds=NUM_CLASSES + 1,  # + the null class
)


def scheduler_for(model: str):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if model == "digits-eps":
        return DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="squaredcos_cap_v2",
            clip_sample=True,
            prediction_type="epsilon",
            timestep_spacing="trailing",
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def diffusion_loss(model: str, unet, scheduler, x0, labels, generator) -> torch.Tensor:
    """One Monte-Carlo draw of the training objective for a batch of clean images x0 [B, 1, 8, 8]."""
    noise = torch.randn(x0.shape, generator=generator)
    if model == "digits-eps":
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        target = noise
        net_t = t
    else:
        t = torch.rand(x0.shape[0], generator=generator)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * noise
        target = noise - x0
        net_t = t * scheduler.config.num_train_timesteps
    pred = unet(x_t, net_t, class_labels=labels).sample
    return torch.nn.functional.mse_loss(pred, target)


def train(model: str, steps: int, batch_size: int, lr: float, label_dropout: float, ema_decay: float,
          seed: int, out: Path, threads: int = 1) -> Path:
    from diffusers import UNet2DModel

    torch.set_num_threads(threads)  # fixed thread count: same float reductions, same weights
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_split("train")
    unet = UNet2DModel(**UNET_CONFIG)
    ema = UNet2DModel(**UNET_CONFIG)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    scheduler = scheduler_for(model)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=model, mininterval=5.0)
    for step in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=generator) < label_dropout] = NUM_CLASSES
        loss = diffusion_loss(model, unet, scheduler, x0, y, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    folder = out / model
    ema.save_pretrained(folder, safe_serialization=True)
    meta = {
        "family": "ddpm" if model == "digits-eps" else "flow",
        "prediction_type": "epsilon" if model == "digits-eps" else "flow",
        "latent_shape": list(IMAGE_SHAPE),
        "condition_names": [str(i) for i in range(NUM_CLASSES)],
        "scheduler_class": type(scheduler).__name__,
        "scheduler_config": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        "training": dict(steps=steps, batch_size=batch_size, lr=lr, label_dropout=label_dropout,
                         ema_decay=ema_decay, seed=seed, threads=threads, wall_time_s=round(time.perf_counter() - start, 1),
                         data="sklearn digits, train split (diffenv.data)"),
    }
    (folder / BACKEND_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved {folder} in {meta['training']['wall_time_s']} s")
    return folder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=EMBEDDED_MODELS, required=True)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (part of the reproducibility recipe)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1:
        p.error(f"--steps and --batch-size must be >= 1, got {a.steps} and {a.batch_size}")
    train(a.model, a.steps, a.batch_size, a.lr, a.label_dropout, a.ema_decay, a.seed, a.out, a.threads)


if __name__ == "__main__":
    main()
