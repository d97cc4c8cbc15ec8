"""The `diffenv` command: `sample` (from `diffenv.cli`) plus `train` (this package)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffenv import cli as env_cli
from diffenv.validation import flag_type, parse_assignments


def cmd_train(a: argparse.Namespace) -> int:
    from agents.algos import ALGORITHMS
    from agents.trainer import TrainConfig, Trainer

    overrides = parse_assignments(ALGORITHMS[a.algo].Config, a.set, flag="--set", owner=a.algo)
    cfg = TrainConfig(algo=a.algo, model=a.model, reward=a.reward, images=a.images, out=a.out, seed=a.seed,
                      num_steps=a.num_steps, guidance_scale=a.guidance_scale, lora_rank=a.lora_rank,
                      device=a.device, grid_every=a.grid_every, eval_images=a.eval_images,
                      progress=not a.no_progress, probe_every=a.probe_every, algo_overrides=overrides,
                      model_kwargs=env_cli.model_kwargs(a), conditions=a.conditions)
    trainer = Trainer(cfg, resume=a.resume)
    before = trainer.evaluate(a.eval_images) if a.eval_images and not a.resume else None
    rows = trainer.train()
    if not trainer.dist.is_main:
        return 0
    if rows:
        print(f"{a.algo}: {len(rows)} epoch(s), {trainer.images_seen} images, train reward "
              f"{rows[0]['reward_mean']:.4f} (first epoch) -> {rows[-1]['reward_mean']:.4f} (last epoch), "
              f"kl_to_base {rows[-1]['kl_to_base']:.3f}, {trainer.wall_time:.1f} s")
    else:
        print(f"{a.algo}: budget of {a.images} images already reached ({trainer.images_seen}); nothing to do")
    if a.eval_images:
        after = trainer.evaluate(a.eval_images)
        b = f"{before['reward_mean']:.4f} -> " if before else ""
        print(f"eval reward ({a.eval_images} images, guidance {a.guidance_scale}, seed 12345): "
              f"{b}{after['reward_mean']:.4f}")
    print(f"wrote {trainer.out}/lora.safetensors, checkpoint.pt, log.csv")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from agents.benchmark.compare import Comparison, load_tasks

    tasks = load_tasks(a.config, quick=a.quick, names=a.tasks)
    start = time.perf_counter()
    Comparison(tasks, a.out, progress=not a.no_progress).run()
    print((Path(a.out) / "results.md").read_text())
    print(f"wrote {a.out}/results.csv, results.md, reward_vs_images.png, frontier.png, grids_*.png "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


def _algo_help() -> str:
    """`--set` help: every algorithm's options with their defaults (from the config dataclasses)."""
    from dataclasses import fields

    from agents.algos import ALGORITHMS

    parts = []
    for name, algo in sorted(ALGORITHMS.items()):
        parts.append(f"{name}: " + ", ".join(f"{f.name}={f.default}" for f in fields(algo.Config)))
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    from agents.algos import ALGORITHMS
    from agents.trainer import TrainConfig

    def field(name):  # the flag's type and range come from the TrainConfig field
        return flag_type(TrainConfig, name)

    parser = env_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    t = env_cli.add_parser(sub, "train", help="post-train a LoRA with a diffusion-RL algorithm",
                           description="Post-train a LoRA adapter on the denoiser with online RL, on a budget of "
                                       "images generated; the run folder (--out) holds log.csv, grids, "
                                       "lora.safetensors and checkpoint.pt.")
    t.add_argument("--algo", required=True, choices=sorted(ALGORITHMS),
                   help="algorithm (agents/algos/NAME.py): " + ", ".join(sorted(ALGORITHMS)))
    env_cli.add_model_args(t)
    t.add_argument("--images", type=field("images"), required=True,
                   help="budget: images generated for training, a multiple of images_per_epoch (default 64)")
    t.add_argument("--out", required=True, help="run directory (checkpoint, LoRA, log.csv, grids)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    t.add_argument("--seed", type=field("seed"), default=0, help="seed of the LoRA init, rollouts and shuffling")
    t.add_argument("--num-steps", type=field("num_steps"), default=None,
                   help="sampler steps per image (default: the model's: 10 for digits, 20 for shapes)")
    t.add_argument("--guidance-scale", type=field("guidance_scale"), default=1.0,
                   help="CFG weight while training (1: the guidance-free model RL is meant to produce)")
    t.add_argument("--lora-rank", type=field("lora_rank"), default=8, help="LoRA rank r (alpha = r)")
    t.add_argument("--grid-every", type=field("grid_every"), default=10, help="image grid every N epochs (0: never)")
    t.add_argument("--eval-images", type=field("eval_images"), default=0,
                   help="evaluate the reward before/after on N images (0: skip)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm option, typed and range-checked, e.g. --set lr=1e-4 --set group_size=4 "
                        "(repeatable). Options and defaults: " + _algo_help())
    t.add_argument("--probe-every", type=field("probe_every"), default=0,
                   help="score a fixed probe set (reward, judge, FD) every N epochs: over-optimisation monitor "
                        "(0: off)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
    c = env_cli.add_parser(sub, "compare", help="the RL-vs-CFG benchmark, from a TOML config (resumable)",
                           description="CFG sweep, best-of-N and every algorithm x budget x seed of a TOML config, "
                                       "evaluated on the same images; writes results.csv/.md and plots to --out.")
    c.add_argument("--config", default="examples/compare.toml", help="TOML file: defaults and [[task]] tables")
    c.add_argument("--out", default="runs/compare", help="output folder (cache/ and runs/ make it resumable)")
    c.add_argument("--quick", action="store_true", help="tiny budgets and eval sets (CI smoke run, < 5 min)")
    c.add_argument("--tasks", nargs="+", default=None, metavar="NAME",
                   help="run only these [[task]] names of the config (default: all)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    from agents.runfolder import RunError

    a = build_parser().parse_args(argv)
    try:
        return env_cli.run(a)
    except RunError as e:  # the run stopped (folder in use, disk full, NaN/inf): one line, exit 1
        print(f"diffenv {a.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
