"""Train the shapes task's scene readers: `shapes_verifier` (reward) and `shapes_judge` (evaluation only).

    python -m retrain.train_shapes_rewards                       # both, seed 0 (verifier) / 1 (judge)
    python -m retrain.train_shapes_rewards --vae runs/train_shapes/vae

Data: rendered images (`rewards.shapes_task`) of prompts drawn uniformly over the four kinds, plus 20 %
random scenes of 0–4 arbitrary objects (so images that match no prompt are read correctly too). Targets: for
each cell of the reader's centre grid, the object whose box centre lies in it (or background) and the offset. Images pass
through a random degradation so that decoded samples, which are blurry and colour-shifted, are read as well:
the verifier sees blur + noise + channel gain; the judge sees a different mix (box blur, colour bleed,
background offset) and, when `--vae` is given, also reconstructions of the shapes autoencoder. Loss:
cross-entropy over the 19 cell classes (object and background cells averaged separately, then summed) + L1 on
the centre offset in object cells.

Accuracy is measured on a separate rendered test set (seed 10_000): exact satisfaction of the image's own
prompt, rejection of hard negatives (relation flipped, colours swapped, count ± 1) and, with `--vae`, the
same on autoencoder reconstructions. Figures go to `rewards/weights/shapes_metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from rewards import shapes_task as task
from rewards.shapes import ARCHS, N_OBJ, WEIGHTS_DIR, ShapesSceneReward, grid_targets

SEEDS = {"shapes_verifier": 0, "shapes_judge": 1}
TEST_SEED = 10_000


def scenes_batch(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[list], list[str]]:
    """n images [n, 3, 32, 32] with their layouts: 80 % from grammar prompts (uniform over kinds), 20 % random
    scenes of 0–4 objects."""
    images, layouts, prompts = [], [], []
    for text in task.sample_prompts(n, rng, split="all"):
        if rng.random() < 0.2:
            objs = tuple((int(o), 1) for o in rng.integers(0, N_OBJ, rng.integers(0, 5)))
            p = task.Prompt("random scene", "random", objs)
        else:
            p = task.parse_prompt(text)
        layout = task.layout(p, rng)
        images.append(task.draw(layout))
        layouts.append(layout)
        prompts.append(text if p.kind != "random" else "")
    return np.stack(images), layouts, prompts


def degrade(x: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
    """Random degradations of images [B, 3, 32, 32] in [0, 1] (a different mix per reader)."""
    b = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    if name == "shapes_verifier":
        sigma = u(b, 1, 1, 1) * 0.9
        k = torch.arange(-2, 3).float()
        w = torch.exp(-k.view(1, -1) ** 2 / (2 * sigma.view(-1, 1) ** 2 + 1e-6))
        w = w / w.sum(-1, keepdim=True)  # [B, 5] per-image Gaussian kernel
        xs = F.pad(x, (2, 2, 2, 2), mode="replicate")
        x = sum(w[:, i].view(-1, 1, 1, 1) * xs[..., 2:-2, i:i + 32] for i in range(5))
        xs = F.pad(x, (0, 0, 2, 2), mode="replicate")
        x = sum(w[:, i].view(-1, 1, 1, 1) * xs[..., i:i + 32, :] for i in range(5))
        x = x * (0.75 + 0.3 * u(b, 3, 1, 1)) + 0.06 * u(b, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    else:
        blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        mix = u(b, 1, 1, 1) * 0.6
        x = (1 - mix) * x + mix * blur
        bleed = u(b, 3, 3) * 0.15 * (u(b, 1, 1) < 0.5)
        x = x + torch.einsum("bij,bjhw->bihw", bleed, x)
        x = x + 0.08 * u(b, 1, 1, 1) * u(b, 3, 1, 1) + 0.04 * torch.randn(x.shape, generator=gen) * u(b, 1, 1, 1)
    return x.clamp(0, 1)


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, gen: torch.Generator, chunk: int = 512) -> torch.Tensor:
    """Autoencoder reconstructions (sampled latents, as diffusion samples are imperfect latents) in [0, 1]."""
    out = []
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(images[i:i + chunk]) * 2 - 1
        z = vae.encode(x).latent_dist.sample(gen)
        out.append(((vae.decode(z).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def train_reader(name: str, steps: int, batch_size: int, lr: float, vae, out: Path) -> Path:
    seed = SEEDS[name]
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    net = ARCHS[name]()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    pool = None
    if vae is not None and name == "shapes_judge":  # a fixed pool of reconstructions, refreshed never (cheap)
        pool_imgs, pool_layouts, _ = scenes_batch(8192, rng)
        pool = (reconstruct(vae, pool_imgs, gen), *grid_targets(pool_layouts, net.stride))
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=name, mininterval=10.0)
    for step in bar:
        imgs, layouts, _ = scenes_batch(batch_size, rng)
        x = degrade(torch.from_numpy(imgs), name, gen)
        classes, offsets = grid_targets(layouts, net.stride)
        if pool is not None:
            idx = torch.randint(0, len(pool[0]), (batch_size // 4,), generator=gen)
            x = torch.cat([x, pool[0][idx]])
            classes, offsets = torch.cat([classes, pool[1][idx]]), torch.cat([offsets, pool[2][idx]])
        logits, pred = net(x)
        # which object's centre is in each cell, or background; object and background cells weigh equally (a
        # plain mean over cells is ~97 % background and learned to find objects but not to name them)
        ce = F.cross_entropy(logits, classes, reduction="none")
        is_obj = classes < N_OBJ
        loss = ce[is_obj].mean() + ce[~is_obj].mean()
        mask = is_obj.unsqueeze(1)
        loss = loss + (F.l1_loss(pred, offsets, reduction="none") * mask).sum() / mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(file))
    meta = dict(arch={}, seed=seed, steps=steps, batch_size=batch_size, lr=lr, used_vae=vae is not None,
                wall_time_s=round(time.perf_counter() - start, 1))
    file.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return file


def hard_negative(text: str, rng: np.random.Generator) -> str:
    """A prompt that the image of `text` must *not* satisfy: relation flipped, colours swapped, count ± 1."""
    p = task.parse_prompt(text)
    (a, _), *rest = p.objects
    if p.kind == "relation":
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return text.replace(p.relation[1], flip[p.relation[1]])
    if p.kind in ("single", "counting"):
        n = p.objects[0][1]
        new = {1: "two", 2: rng.choice(["a", "three"]), 3: "two"}[n]
        c, s = task.OBJECTS[a]
        return f"{new} {c} {s}s" if new != "a" else f"a {c} {s}"
    b = rest[0][0]
    (ca, sa), (cb, sb) = task.OBJECTS[a], task.OBJECTS[b]
    if ca == cb or sa == sb:  # swapping colours would give the same pair: change the second object's shape
        sb = next(s for s in task.SHAPES if s not in (sa, sb))
    else:
        ca, cb = cb, ca
    first, second = sorted([task.OBJECTS.index((ca, sa)), task.OBJECTS.index((cb, sb))])
    return f"a {' '.join(task.OBJECTS[first])} and a {' '.join(task.OBJECTS[second])}"


def evaluate(names: list[str], vae, folder: Path = WEIGHTS_DIR, n: int = 4000) -> dict:
    """Exact-satisfaction accuracy of each reader on rendered test images (positives and hard negatives)."""
    rng = np.random.default_rng(TEST_SEED)
    prompts = task.sample_prompts(n, rng, split="all")
    images, _ = task.render(prompts, seed=TEST_SEED)
    negatives = [hard_negative(p, rng) for p in prompts]
    sets = {"rendered": torch.from_numpy(images)}
    if vae is not None:
        sets["vae_reconstruction"] = reconstruct(vae, images, torch.Generator().manual_seed(TEST_SEED))
    index = {p: i for i, p in enumerate(task.model_prompts())}
    pos = torch.tensor([index[p] for p in prompts])
    neg = torch.tensor([index[p] for p in negatives])
    kinds = np.array([task.kind_of(p) for p in prompts])
    metrics: dict = {}
    for name in names:
        reader = ShapesSceneReward(name, path=folder / f"{name}.safetensors")
        for label, x in sets.items():
            ok_pos = reader.satisfied(x, pos).numpy()
            ok_neg = ~reader.satisfied(x, neg).numpy()
            metrics[f"{name}/{label}"] = {
                "positives": round(float(ok_pos.mean()), 4), "hard_negatives": round(float(ok_neg.mean()), 4),
                **{f"positives_{k}": round(float(ok_pos[kinds == k].mean()), 4) for k in task.KINDS}}
    return metrics


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--which", nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS, reverse=True),
                   help="readers to train")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps per reader")
    p.add_argument("--batch-size", type=int, default=128, help="batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle)")
    p.add_argument("--vae", type=Path, default=None, help="shapes autoencoder folder: judge data + evaluation")
    p.add_argument("--eval-only", action="store_true", help="only measure the saved readers")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="weights folder")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    vae = None
    if a.vae is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(a.vae, use_safetensors=True).eval()
    if not a.eval_only:
        for name in a.which:
            train_reader(name, a.steps, a.batch_size, a.lr, vae, a.out)
    metrics = evaluate(a.which, vae, a.out)
    print(json.dumps(metrics, indent=2))
    file = a.out / "shapes_metrics.json"
    old = json.loads(file.read_text()) if file.is_file() else {}
    file.write_text(json.dumps({**old, **metrics}, indent=2) + "\n")


if __name__ == "__main__":
    main()
