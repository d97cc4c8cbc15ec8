"""The `diffenv` command line: `diffenv sample ...` (and the subcommands later issues add)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not np.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that samples the model."""
    p.add_argument("--model", default="digits-eps",
                   help="digits-eps | digits-flow | sd:PATH | sdxl:PATH | sd3:PATH | flux:PATH (default: digits-eps)")
    p.add_argument("--prompts", default=None, help="prompt file (one per line) for text-to-image models")
    p.add_argument("--reward", default="digit_classifier", help="reward name, or 'none'")
    p.add_argument("--num-steps", type=_positive_int, default=10)
    p.add_argument("--sampler", default=None, help="ddim | ddpm | ode | flow_sde (default: the model's)")
    p.add_argument("--eta", type=_non_negative_float, default=1.0, help="DDIM eta")
    p.add_argument("--guidance-scale", type=_non_negative_float, default=1.0, help="CFG weight; 1 = no CFG")
    p.add_argument("--conditions", type=int, nargs="+", default=None, help="condition ids to sample")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)


def model_kwargs(a: argparse.Namespace) -> dict:
    """Backend options from flags (`--prompts`)."""
    return {"prompts": a.prompts} if getattr(a, "prompts", None) else {}


def env_kwargs(a: argparse.Namespace) -> dict:
    return dict(model=a.model, reward=None if a.reward == "none" else a.reward, num_steps=a.num_steps,
                sampler=a.sampler, eta=a.eta, guidance_scale=a.guidance_scale, conditions=a.conditions,
                device=a.device, model_kwargs=model_kwargs(a) or None)


def load_model(a: argparse.Namespace):
    """The backend named by --model, with the --lora adapter (if any) loaded into its denoiser."""
    if not getattr(a, "lora", None):
        return a.model
    from diffenv.models import load_backend
    from diffenv.models.lora import load_lora

    backend = load_backend(a.model, device=a.device, **model_kwargs(a))
    meta = load_lora(backend.denoiser, a.lora)
    base = meta.get("model")
    if base is not None and base != a.model:
        raise ValueError(f"--lora {a.lora} was trained on model {base!r}, but --model is {a.model!r}")
    return backend


def cmd_sample(a: argparse.Namespace) -> int:
    from diffenv.sampling import generate
    from diffenv.viz import save_grid

    kwargs = env_kwargs(a)
    if getattr(a, "lora", None):  # the backend is built here, with its options
        kwargs.update(model=load_model(a), model_kwargs=None)
    result = generate(a.n, batch_size=a.batch_size, seed=a.seed, progress=a.n > a.batch_size, **kwargs)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp.npz")
        np.savez_compressed(tmp, images=result.images.numpy().astype(np.float32),
                            conditions=result.conditions.numpy().astype(np.int64),
                            rewards=result.rewards.numpy().astype(np.float32))
        tmp.replace(out)  # atomic: a crash never leaves a half-written npz
        print(f"wrote {out} ({len(result.images)} images)")
    if a.grid:
        order = result.conditions[: min(100, a.n)].argsort(stable=True)
        print(f"wrote {save_grid(result.images[: min(100, a.n)][order], a.grid, nrow=10)}")
    print(f"model={a.model} guidance_scale={a.guidance_scale} num_steps={a.num_steps} n={a.n} seed={a.seed}")
    if a.reward != "none":
        print(f"mean reward ({a.reward}): {result.rewards.mean():.4f} ± {result.rewards.std():.4f}")
        for name, v in result.components.items():
            if name != a.reward:
                print(f"  component {name}: {v.mean():.4f}")
    if a.judge:
        import rewards

        judge = rewards.make(a.judge, mode="correct")
        acc = judge(result.images, result.conditions).mean().item()
        print(f"judge accuracy ({a.judge}): {acc:.4f}")
    print(f"NFE per image: {result.nfe_per_image:g}")
    print(f"wall time: {result.wall_time_s:.2f} s ({1e3 * result.seconds_per_image:.3f} ms/image)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffenv", description="DiffusionSteer: steer diffusion models with RL")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="sample the (base) model and score the images")
    add_sampling_args(s)
    s.add_argument("--n", type=_positive_int, default=100, help="number of images")
    s.add_argument("--batch-size", type=_positive_int, default=250)
    s.add_argument("--out", default=None, help="npz file for images [N,C,H,W] in [0,1] and conditions [N]")
    s.add_argument("--grid", default=None, help="PNG grid of the first 100 images")
    s.add_argument("--lora", default=None, help="LoRA adapter (safetensors) to sample the tuned model")
    s.add_argument("--judge", default=None, help="also report accuracy by this classifier (e.g. digit_judge)")
    s.set_defaults(func=cmd_sample)
    from diffenv import ab

    ab.add_parser(sub)
    return parser


def run(a: argparse.Namespace) -> int:
    """Run a parsed subcommand; user errors become one clear line on stderr and exit code 2."""
    try:
        return a.func(a)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"diffenv {a.command}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
