"""The `diffenv` command line: `diffenv sample ...` (and the subcommands later issues add).

Every flag that sets a config field takes its type and range from that field (`diffenv.validation`), so
the command line and the Python API reject the same values with the same words. `run` is the one place
errors reach the user: a user error prints one line and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from diffenv import ab
from diffenv.config import EnvConfig
from diffenv.validation import flag_type, number_type

#: third-party log lines the CLI drops: (logger, message pattern). Each is expected in this repo and
#: gives the user nothing to act on; everything else those libraries log still shows.
QUIET_LOGS = (
    # image processors of pipelines we load but never use (safety checker, IP adapters)
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back"),
    # our LoRAs adapt the denoiser only, so loading one finds no text-encoder keys
    ("diffusers.loaders.lora_base", r"No LoRA keys associated to \w+ found"),
    ("diffusers.loaders.peft", r"No LoRA keys associated to \w+ found"),
    ("diffusers.loaders.lora_pipeline", r"No LoRA keys associated to \w+ found"),
)
#: third-party warnings the CLI drops: (category, message pattern, module)
QUIET_WARNINGS = (
    # `compare`'s SB3 PPO: a last, smaller mini-batch per epoch is intended (K steps x 32 envs)
    (UserWarning, r"You have specified a mini-batch size of", r"stable_baselines3\."),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_third_party() -> None:
    """Install the targeted filters above (idempotent)."""
    for name, pattern in QUIET_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says what the default means
    or there is none to show (required options, on/off flags, unset options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or action.required or action.default in (None, [], False):
            return text
        return super()._get_help_string(action)


def add_parser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand with the shared help formatter and the `--threads` option."""
    p = sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)
    p.add_argument("--threads", type=number_type(int, ge=1), default=None,
                   help="torch CPU threads (torch.set_num_threads); default: torch's own, one per core. Set it "
                        "when other jobs share the CPU: oversubscribed threads made sampling 6x slower")
    return p


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

    return "reward name: " + " | ".join(rewards.names()) + " | none"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags naming the model, its prompts, the reward and the device (sample and train)."""
    p.add_argument("--model", default="digits-eps", help=model_help())
    p.add_argument("--prompts", default=None, help="prompt file (one per line) for text-to-image models; "
                   "'# split: NAME' lines name subsets for --conditions")
    p.add_argument("--reward", default="digit_classifier", help=reward_help())
    p.add_argument("--device", type=flag_type(EnvConfig, "device"), default="cpu",
                   help="torch device: cpu, cuda, cuda:N, mps")
    p.add_argument("--conditions", type=condition_token, nargs="+", default=None, metavar="ID_OR_SPLIT",
                   help="condition ids (digit classes, prompt indices) or split names the model declares "
                        "(e.g. heldout). sample: images balanced over them (--conditions 3 7 --n 200: 100 of "
                        "each); train: each group's condition drawn uniformly from them. default: all")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that samples the model."""
    add_model_args(p)
    p.add_argument("--num-steps", type=flag_type(EnvConfig, "num_steps"), default=None,
                   help="sampler steps per image (default: the model's: 10 for digits, 20 for shapes)")
    p.add_argument("--sampler", default=None, help="ddim | ddpm | ode (ε-models); flow_sde | ode (flow models); "
                   "default: the model's (ddim / flow_sde)")
    p.add_argument("--eta", type=flag_type(EnvConfig, "eta"), default=1.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--guidance-scale", type=flag_type(EnvConfig, "guidance_scale"), default=1.0,
                   help="CFG weight; 1 = no CFG (1 NFE/step), otherwise 2 NFE/step")
    p.add_argument("--seed", type=flag_type(EnvConfig, "seed"), default=0, help="seed of x_T and the noise")


def model_kwargs(a: argparse.Namespace) -> dict:
    """Backend options from flags (`--prompts`)."""
    return {"prompts": a.prompts} if getattr(a, "prompts", None) else {}


def env_kwargs(a: argparse.Namespace) -> dict:
    """Env arguments from flags; `--conditions` is the env's condition set (`generate(condition_set=)`)."""
    return dict(model=a.model, reward=None if a.reward == "none" else a.reward, num_steps=a.num_steps,
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

    judge = None
    if a.judge:  # before sampling, so a bad name fails at once
        import rewards

        judge = rewards.make(a.judge, mode="correct")
    kwargs = env_kwargs(a)
    if getattr(a, "lora", None):  # the backend is built here, with its options
        kwargs.update(model=load_model(a), model_kwargs=None)
    result = generate(a.n, batch_size=a.batch_size, seed=a.seed, condition_set=a.conditions,
                      progress=a.n > a.batch_size and not a.no_progress, **kwargs)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffenv", description="DiffusionSteer: steer diffusion models with RL",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = add_parser(sub, "sample", help="sample the (base or --lora tuned) model and score the images",
                   description="Sample the model with its own sampler, write images/grid, print reward, NFE, time.")
    add_sampling_args(s)
    s.add_argument("--n", type=number_type(int, ge=1), default=100, help="number of images")
    s.add_argument("--batch-size", type=number_type(int, ge=1), default=250, help="images per batched episode")
    s.add_argument("--out", default=None, help="npz file for images [N,C,H,W] in [0,1], conditions [N], rewards [N]")
    s.add_argument("--grid", default=None, help="PNG grid of the first 100 images")
    s.add_argument("--lora", default=None, help="LoRA adapter (a run's lora.safetensors), merged into the "
                   "weights before sampling: the tuned model at the base model's cost")
    s.add_argument("--judge", default=None, help="also report accuracy by this classifier (e.g. digit_judge)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)
    p = add_parser(sub, "ab", help="A/B: base pipeline with CFG vs guidance-free LoRA, same prompts and seeds",
                   description=ab.DESCRIPTION)
    ab.add_arguments(p)
    p.set_defaults(func=ab.cmd_ab)
    return parser


def run(a: argparse.Namespace) -> int:
    """Run a parsed subcommand; user errors become one clear line on stderr and exit code 2."""
    quiet_third_party()
    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)
    try:
        return a.func(a)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:
        print(f"diffenv {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffenv {a.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
