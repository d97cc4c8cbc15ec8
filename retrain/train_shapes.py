"""Train the embedded `shapes` model: a real diffusers `StableDiffusionPipeline` at 32×32 (seeded, CPU).

    python -m retrain.train_shapes --stage vae     # AutoencoderKL, 32×32×3 -> 8×8×4
    python -m retrain.train_shapes --stage unet    # CLIP text encoder + cross-attention UNet, jointly
    python -m retrain.train_shapes                 # both, then writes the pipeline folder

Data are rendered on the fly by `rewards.shapes_task` from the *training* prompt split only (the held-out
binding/relation prompts are never seen), prompts drawn uniformly over the four prompt kinds. The defaults are the
shipped model's recipe, including 10 % caption noise (`noisy_captions`: the web-caption analogue that makes CFG
needed; docs/design.md §11 has the ladder that led to it).

- VAE (Kingma & Welling 2014; the SD autoencoder in miniature): 3 encoder/decoder levels, MSE + β·KL,
  fresh images every step; `scaling_factor` = 1 / std of the training latents, as SD sets it.
- Text encoder: `CLIPTextModel` over a word-level `CLIPTokenizer` (one BPE token per grammar word, built here),
  trained jointly with the UNet (there is no pretrained CLIP at this scale).
- UNet: `UNet2DConditionModel` with cross-attention, DDPM ε-objective (Ho et al. 2020, eq. 14) on a cosine
  schedule, T = 1000; prompts dropped to "" with probability `prompt_dropout` so one network gives both CFG
  branches; the EMA of the weights (UNet and text encoder) is saved.

The pipeline folder (`diffenv/models/weights/shapes/`) loads with `StableDiffusionPipeline.from_pretrained`
and carries `prompts.txt` (the condition set, with `# split: train` / `# split: heldout` sections) and `training.json` (the recipe and wall times).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffenv.models.shapes import SHAPES_DIR
from rewards import shapes_task as task

WEIGHTS = SHAPES_DIR  # the shipped pipeline folder, diffenv/models/weights/shapes
WORK = Path("runs/train_shapes")
MAX_TOKENS = 10  # BOS + the longest prompt's 8 words + EOS
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=task.SIZE,
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32)
TEXT_CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=MAX_TOKENS, projection_dim=128)
UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
                   attention_head_dim=8, norm_num_groups=32)
# Sampling starts at t = 951 ("leading" spacing, SD's own), not 999: under the capped cosine schedule ᾱ_999 ≈ 0,
# and ε-prediction's x̂0 = (x − √(1−ᾱ) ε̂) / √ᾱ amplifies the network's error by 1/√ᾱ there (with "trailing"
# spacing the first model's latents blew up to std ~770 and every sample was noise).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1)


# ---------------------------------------------------------------------------------------------- data
def rendered_batch(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """n training images in [-1, 1] [n, 3, 32, 32] with their prompts."""
    prompts = task.sample_prompts(n, rng)
    images, _ = task.render(prompts, seed=int(rng.integers(2**31)))
    return torch.from_numpy(images) * 2 - 1, prompts


# ---------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(folder: Path):
    """A `CLIPTokenizer` whose BPE turns every grammar word into exactly one token (vocab.json + merges.txt).

    The merges are *learned* by byte-pair encoding on the word list (merge the most frequent adjacent pair,
    ties broken alphabetically, until every word is one symbol), so applying them in rank order, as the
    tokenizer does, rebuilds each word; every intermediate symbol is in the vocabulary too.
    """
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    merges: list[str] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for ch in "abcdefghijklmnopqrstuvwxyz":
        add(ch)
        add(ch + "</w>")
    words = [[*w[:-1], w[-1] + "</w>"] for w in task.WORDS]
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + 1
        if not pairs:
            break
        best = min(pairs, key=lambda q: (-pairs[q], q))
        merges.append(" ".join(best))
        add(best[0] + best[1])
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [best[0] + best[1]]
                i += 1
    add(BOS)
    add(EOS)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), bos_token=BOS, eos_token=EOS,
                        unk_token=EOS, pad_token=EOS, model_max_length=MAX_TOKENS)
    for word in task.WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits {word!r} into {ids}; expected one token")
    return tok


def tokenize(tok, prompts: list[str]) -> torch.Tensor:
    """Token ids [n, MAX_TOKENS], padded exactly as `StableDiffusionPipeline.encode_prompt` pads them."""
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------- stages
def lr_lambda(steps: int, warmup: int):
    return lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, steps) / steps))


def train_vae(steps: int, batch_size: int, lr: float, kl_weight: float, seed: int, work: Path) -> dict:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, 100))
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="vae", mininterval=10.0)
    for step in bar:
        x, _ = rendered_batch(batch_size, rng)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(gen)).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        loss = mse + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.5f}")
    vae.eval()
    with torch.no_grad():  # latent std on fresh data -> SD's scaling factor
        x, prompts = rendered_batch(2048, np.random.default_rng(seed + 1))
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample.clamp(-1, 1)
        test_mse = float(torch.nn.functional.mse_loss(rec, x))
        ok = np.mean([task.satisfies(p, *_scene(img)) for p, img in zip(prompts, ((rec + 1) / 2).numpy())])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(work / "vae", safe_serialization=True)
    stats = dict(steps=steps, batch_size=batch_size, lr=lr, kl_weight=kl_weight, seed=seed,
                 wall_time_s=round(time.perf_counter() - start, 1), test_mse=round(test_mse, 6),
                 reconstruction_rule_accuracy=round(float(ok), 4), latent_std=round(float(z.std()), 4))
    print("vae", stats)
    return stats


def _scene(image: np.ndarray):
    s = task.rule_scene(image)
    return s.counts, s.centres


@torch.no_grad()
def encode_dataset(vae, n: int, seed: int, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n rendered training images -> latent means and stds [n, 4, 8, 8] (unscaled, on the VAE's device) and their
    prompts."""
    rng = np.random.default_rng(seed)
    means, stds, prompts = [], [], []
    for i in tqdm(range(0, n, chunk), desc="encode", mininterval=10.0):
        x, p = rendered_batch(min(chunk, n - i), rng)
        dist = vae.encode(x.to(vae.device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        prompts += p
    return torch.cat(means), torch.cat(stds), prompts


def noisy_captions(prompts: list[str], rate: float, rng: np.random.Generator) -> list[str]:
    """Each caption replaced, with probability `rate`, by an independently drawn training prompt (the image is kept).

    The web-caption analogue: text-to-image data pair images with alt text that often does not describe them,
    so the model's conditional p(x | c) is a mixture (1 − rate) p_clean(x | c) + rate p(x), and sampling it
    unguided puts that share of images off the prompt; CFG's p(x | c)^w p(x)^(1−w) suppresses exactly that
    mass (the off-prompt images gain nothing from c), which is the regime the task is built to show."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"caption_noise must be in [0, 1), got {rate}")
    noisy = np.flatnonzero(rng.random(len(prompts)) < rate)
    out = list(prompts)
    for i, p in zip(noisy, task.sample_prompts(len(noisy), rng)):
        out[i] = p
    return out


def train_unet(steps: int, batch_size: int, lr: float, prompt_dropout: float, ema_decay: float, n_data: int,
               seed: int, work: Path, channels: tuple[int, int] = UNET_CONFIG["block_out_channels"],
               device: str = "cpu", caption_noise: float = 0.0) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(work / "vae", use_safetensors=True).eval().to(device)
    t0 = time.perf_counter()
    means, stds, prompts = encode_dataset(vae, n_data, seed + 2)
    encode_s = time.perf_counter() - t0
    scale = vae.config.scaling_factor
    prompts = noisy_captions(prompts, caption_noise, np.random.default_rng(seed + 3))
    tok = build_tokenizer(work / "tokenizer")
    ids = tokenize(tok, prompts)
    empty = tokenize(tok, [""])[0]
    text_cfg = CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **TEXT_CONFIG)
    unet_cfg = {**UNET_CONFIG, "block_out_channels": tuple(channels)}
    text, unet = CLIPTextModel(text_cfg).to(device), UNet2DConditionModel(**unet_cfg).to(device)
    ema_text, ema_unet = CLIPTextModel(text_cfg).to(device), UNet2DConditionModel(**unet_cfg).to(device)
    ema_text.load_state_dict(text.state_dict())
    ema_unet.load_state_dict(unet.state_dict())
    params = [*text.parameters(), *unet.parameters()]
    ema_params = [*ema_text.parameters(), *ema_unet.parameters()]
    for p in ema_params:
        p.requires_grad_(False)
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, 200))
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="unet", mininterval=10.0)
    shape = (batch_size, *means.shape[1:])
    for step in bar:  # every random draw comes from the CPU generator, so the recipe is the same on any device
        idx = torch.randint(0, n_data, (batch_size,), generator=gen)
        rows = idx.to(device)
        z0 = (means[rows] + stds[rows] * torch.randn(shape, generator=gen).to(device)) * scale
        tokens = ids[idx].clone()
        tokens[torch.rand(batch_size, generator=gen) < prompt_dropout] = empty
        tokens = tokens.to(device)
        noise = torch.randn(shape, generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen).to(device)
        z_t = noise_sched.add_noise(z0, noise, t)
        emb = text(tokens)[0]
        loss = torch.nn.functional.mse_loss(unet(z_t, t, encoder_hidden_states=emb).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema_text.save_pretrained(work / "text_encoder", safe_serialization=True)
    ema_unet.save_pretrained(work / "unet", safe_serialization=True)
    tok.save_pretrained(work / "tokenizer")
    stats = dict(steps=steps, batch_size=batch_size, lr=lr, prompt_dropout=prompt_dropout, ema_decay=ema_decay,
                 n_data=n_data, seed=seed, block_out_channels=list(channels), device=str(device),
                 caption_noise=caption_noise, encode_s=round(encode_s, 1),
                 wall_time_s=round(time.perf_counter() - start, 1), final_loss=round(float(loss.detach()), 5))
    print("unet", stats)
    return stats


def assemble(work: Path, out: Path, stats: dict) -> Path:
    """Write the `StableDiffusionPipeline` folder (safetensors) plus the prompt splits and the recipe."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae", use_safetensors=True),
        text_encoder=CLIPTextModel.from_pretrained(work / "text_encoder", use_safetensors=True),
        tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(work / "unet", use_safetensors=True),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    lines = ["# The shapes task's prompts (rewards.shapes_task); condition id = line order, train split first."]
    for split in ("train", "heldout"):
        lines += [f"# split: {split}", *task.split_prompts(split)]
    (out / "prompts.txt").write_text("\n".join(lines) + "\n")
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"saved {out}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", choices=("vae", "unet", "assemble", "all"), default="all",
                   help="what to train ('assemble' only rewrites the pipeline folder from --work)")
    p.add_argument("--vae-steps", type=int, default=1200, help="autoencoder optimizer steps")
    p.add_argument("--vae-batch-size", type=int, default=64, help="autoencoder batch size")
    p.add_argument("--unet-steps", type=int, default=4000, help="UNet + text encoder optimizer steps")
    p.add_argument("--unet-batch-size", type=int, default=128, help="UNet batch size")
    p.add_argument("--unet-lr", type=float, default=8e-4, help="UNet + text encoder peak learning rate")
    p.add_argument("--n-data", type=int, default=60000, help="rendered images pre-encoded for the UNet stage")
    p.add_argument("--unet-channels", type=int, nargs=2, default=list(UNET_CONFIG["block_out_channels"]),
                   help="UNet block_out_channels (two levels; each a multiple of 32)")
    p.add_argument("--device", default="cpu", help="torch device of the UNet stage (data and noise are drawn on "
                   "the CPU, so only float rounding differs between devices)")
    p.add_argument("--caption-noise", type=float, default=0.1,
                   help="share of training captions replaced by a random training prompt (web-caption noise)")
    p.add_argument("--prompt-dropout", type=float, default=0.1, help="probability of the empty prompt (CFG)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and noise")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (part of the reproducibility recipe)")
    p.add_argument("--work", type=Path, default=WORK, help="folder for the stages' outputs")
    p.add_argument("--out", type=Path, default=WEIGHTS, help="pipeline folder written at the end")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    stats_file = a.work / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    if a.stage in ("vae", "all"):
        stats["vae"] = train_vae(a.vae_steps, a.vae_batch_size, 1e-3, 1e-6, a.seed, a.work)
        stats_file.write_text(json.dumps(stats, indent=2))
    if a.stage in ("unet", "all"):
        stats["unet"] = train_unet(a.unet_steps, a.unet_batch_size, a.unet_lr, a.prompt_dropout, 0.999,
                                   a.n_data, a.seed, a.work, tuple(a.unet_channels), a.device,
                                   a.caption_noise)
        stats["threads"] = a.threads
        stats_file.write_text(json.dumps(stats, indent=2))
    if a.stage in ("unet", "assemble", "all"):
        assemble(a.work, a.out, stats)


if __name__ == "__main__":
    main()
