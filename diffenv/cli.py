"""The `diffenv sample` command and what the `diffenv` command needs from the env side.

The parser itself is built in one place, `agents.cli`, from config dataclasses and their field docs: the env's
(`diffenv.config.EnvConfig`) and the command options below (`CommonOptions`, `ModelOptions`, `SampleOptions`;
`diffenv.ab.ABOptions`), so a flag's type, range and help are written once, next to its field, and the command
line and the Python API reject the same values with the same words (`diffenv.validation`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffenv.paths import check_output_file
from diffenv.tasks import resolve_reward
from diffenv.validation import bounds

@dataclass
class CommonOptions:
    """Options of every subcommand."""

    threads: int | None = field(default=None, metadata=bounds(ge=1))
    """torch CPU threads (torch.set_num_threads); default: torch's own, one per core. Set it when other jobs share
    the CPU: oversubscribed threads made sampling 6x slower"""


@dataclass
class ModelOptions:
    """Backend options of the commands that load a model by name (`sample`, `train`)."""

    prompts: str | None = None
    """prompt file (one per line) for text-to-image models; '# split: NAME' lines name subsets for --conditions"""


@dataclass
class SampleOptions:
    """`diffenv sample`'s options beyond the env's arguments."""

    n: int = field(default=100, metadata=bounds(ge=1))
    """number of images"""
    batch_size: int = field(default=250, metadata=bounds(ge=1))
    """images per batched episode"""
    out: str | None = None
    """npz file for images [N,C,H,W] in [0,1], conditions [N], rewards [N]"""
    grid: str | None = None
    """PNG grid of the first 100 images"""
    lora: str | None = None
    """LoRA adapter (a run's lora.safetensors), merged into the weights before sampling: the tuned model at the
    base model's cost"""
    judge: str | None = None
    """also report accuracy by this classifier (e.g. digit_judge)"""
    progress: bool = True
    """progress bar"""


def condition_token(text: str) -> int | str:
    """`--conditions` items: digits are condition ids (class / prompt index), anything else a split name."""
    try:
        return int(text)
    except ValueError:
        return text


def model_help() -> str:
    from diffenv.models import model_names

    return " | ".join(model_names()) + " (PATH: a local diffusers folder or hub id)"


def reward_help() -> str:
    import rewards

    return ("reward name: " + " | ".join(rewards.names()) + " | none (default: the model's task's reward, "
            "diffenv/tasks.py: digit_classifier for digits, shapes_verifier for shapes)")


def model_kwargs(a: argparse.Namespace) -> dict:
    """Backend options from flags (`--prompts`)."""
    return {"prompts": a.prompts} if getattr(a, "prompts", None) else {}


def env_kwargs(a: argparse.Namespace) -> dict:
    """Env arguments from flags; `--conditions` is the env's condition set (`generate(condition_set=)`). A bad
    prompt file is named first, then a model without a default reward."""
    if getattr(a, "prompts", None):
        from diffenv.models.prompts import load_prompts

        load_prompts(a.prompts)
    return dict(model=a.model, reward=None if a.reward == "none" else resolve_reward(a.reward, a.model),
                num_steps=a.num_steps,
                sampler=a.sampler, eta=a.eta, guidance_scale=a.guidance_scale, device=a.device,
                model_kwargs=model_kwargs(a) or None)


def load_model(a: argparse.Namespace):
    """The backend named by --model with the --lora adapter merged into its weights (if any): the tuned
    model costs what the base model costs, as deployed (the same loader as `diffenv compare`)."""
    if not getattr(a, "lora", None):
        return a.model
    from diffenv.models import load_tuned_backend

    return load_tuned_backend(a.model, a.lora, device=a.device, **model_kwargs(a))


def cmd_sample(a: argparse.Namespace) -> int:
    from diffenv.sampling import generate
    from diffenv.viz import save_grid

    for flag, path, suffixes in (("--out", a.out, ()), ("--grid", a.grid, (".png",))):
        if path:  # before sampling, so a bad path fails at once
            check_output_file(path, flag, suffixes)
    judge = None
    if a.judge:  # before sampling, so a bad name fails at once
        import rewards

        judge = rewards.make(a.judge, mode="correct")
    kwargs = env_kwargs(a)
    a.reward = "none" if kwargs["reward"] is None else kwargs["reward"]  # the name the summary prints
    if getattr(a, "lora", None):  # the backend is built here, with its options
        kwargs.update(model=load_model(a), model_kwargs=None)
    result = generate(a.n, batch_size=a.batch_size, seed=a.seed, condition_set=a.conditions,
                      progress=a.n > a.batch_size and a.progress, **kwargs)
    text_conditioned = result.text_conditioned
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp.npz")
        extra = {"prompts": np.array(result.prompts, dtype=str)} if text_conditioned else {}
        np.savez_compressed(tmp, images=result.images.numpy().astype(np.float32),
                            conditions=result.conditions.numpy().astype(np.int64),
                            rewards=result.rewards.numpy().astype(np.float32), **extra)
        tmp.replace(out)  # atomic: a crash never leaves a half-written npz
        print(f"wrote {out} ({len(result.images)} images)")
    if a.grid:
        order = result.conditions[: min(100, a.n)].argsort(stable=True)
        captions = [result.prompts[i] for i in order.tolist()] if text_conditioned else None
        print(f"wrote {save_grid(result.images[: min(100, a.n)][order], a.grid, nrow=10, captions=captions)}")
    print(f"model={a.model} guidance_scale={a.guidance_scale} num_steps={result.num_steps} n={a.n} seed={a.seed}")
    if a.reward != "none":
        print(f"mean reward ({a.reward}): {result.rewards.mean():.4f} ± {result.rewards.std():.4f}")
        for name, v in result.components.items():
            if name != a.reward:
                print(f"  component {name}: {v.mean():.4f}")
    if judge is not None:
        acc = judge(result.images, result.conditions).mean().item()
        print(f"judge accuracy ({a.judge}): {acc:.4f}")
    print(f"NFE per image: {result.nfe_per_image:g}")
    print(f"wall time: {result.wall_time_s:.2f} s ({1e3 * result.seconds_per_image:.3f} ms/image)")
    return 0
