"""The `diffenv` command: `sample` (from `diffenv.cli`) plus `train` (this package)."""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

from diffenv import cli as env_cli


def _override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. lr=1e-4), got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip(), parsed


def cmd_train(a: argparse.Namespace) -> int:
    from agents.trainer import TrainConfig, Trainer

    cfg = TrainConfig(algo=a.algo, model=a.model, reward=a.reward, images=a.images, out=a.out, seed=a.seed,
                      num_steps=a.num_steps, guidance_scale=a.guidance_scale, lora_rank=a.lora_rank,
                      device=a.device, grid_every=a.grid_every, eval_images=a.eval_images,
                      progress=not a.no_progress, probe_every=a.probe_every, algo_overrides=dict(a.set),
                      model_kwargs=env_cli.model_kwargs(a))
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
    from agents.compare import Comparison, load_tasks

    tasks = load_tasks(a.config, quick=a.quick)
    start = time.perf_counter()
    Comparison(tasks, a.out, progress=not a.no_progress).run()
    print((Path(a.out) / "results.md").read_text())
    print(f"wrote {a.out}/results.csv, results.md, reward_vs_images.png, frontier.png, grids_*.png "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from agents.algos import ALGORITHMS

    parser = env_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    t = sub.add_parser("train", help="post-train a LoRA with a diffusion-RL algorithm")
    t.add_argument("--algo", required=True, choices=sorted(ALGORITHMS))
    t.add_argument("--model", default="digits-eps")
    t.add_argument("--prompts", default=None, help="prompt file (one per line) for text-to-image models")
    t.add_argument("--reward", default="digit_classifier")
    t.add_argument("--images", type=int, required=True, help="budget: images generated for training")
    t.add_argument("--out", required=True, help="run directory (checkpoint, LoRA, log.csv, grids)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--num-steps", type=env_cli._positive_int, default=10)
    t.add_argument("--guidance-scale", type=env_cli._non_negative_float, default=1.0)
    t.add_argument("--lora-rank", type=env_cli._positive_int, default=8)
    t.add_argument("--device", default="cpu")
    t.add_argument("--grid-every", type=int, default=10, help="image grid every N epochs (0: never)")
    t.add_argument("--eval-images", type=int, default=0, help="evaluate reward before/after on N images")
    t.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm option, e.g. --set lr=1e-4 --set group_size=4 (repeatable)")
    t.add_argument("--probe-every", type=int, default=0,
                   help="score a fixed probe set (reward, judge, FD) every N epochs: over-optimisation monitor")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("compare", help="the RL-vs-CFG benchmark, from a TOML config (resumable)")
    c.add_argument("--config", default="examples/compare.toml")
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--quick", action="store_true", help="tiny budgets and eval sets (CI smoke run, < 5 min)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "train" and a.images < 1:
        print(f"diffenv train: error: --images must be a positive budget, got {a.images}", file=sys.stderr)
        return 2
    return env_cli.run(a)


if __name__ == "__main__":
    sys.exit(main())
