"""Training throughput per algorithm as a fraction of sampling, and where an epoch's time goes, on any model.

    python benchmarks/train_throughput.py --model shapes --images 256
    python benchmarks/train_throughput.py --model shapes --train-num-steps 10 --set train_fraction=0.25 \\
        --set fdfo.kl_coef=0.1 --json runs/throughput.json

For each algorithm: images/s of `Trainer.train_epoch` (collect → reward → prepare → update, plus the epoch's
diagnostics) over `--images` images after one warm-up epoch, as a fraction of plain sampling (`generate`: the same
model at `--num-steps`, the steps you evaluate and deploy at, batch 64, guidance 1). Training rollouts use
`--train-num-steps` (default: `--num-steps`). The profile splits the measured epochs into the trainer's phases
(`agents.trainer.PHASES`): `rollout` (denoising, without the reward), `reward` (the env's reward call), `prepare`
(advantages, old-policy and reference forwards), `loss` (forward of the training minibatches), `backward`
(backward, clip, optimizer step), `diagnostics` (the KL-to-base estimate and the epoch's one host sync).
Algorithms use their default configs with images_per_epoch = `--images-per-epoch`, then `--set` options:
`KEY=VALUE` for every algorithm that has the option, `ALGO.KEY=VALUE` for one.
Each algorithm's ratio is to sampling timed right before and right after it, in the same process, so the ratios
hold on a machine with other work; absolute images/s need a quiet one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from agents.algos import ALGORITHMS
from agents.trainer import PHASES, TrainConfig, Trainer
from diffenv.sampling import generate
from diffenv.validation import parse_text

#: each embedded model's task reward (a model without an entry needs --reward)
TASK_REWARDS = {"digits-eps": "digit_classifier", "digits-flow": "digit_classifier", "shapes": "shapes_verifier"}
BATCH = 64


class TimedReward:
    """A reward wrapper that adds the time of every call to `seconds` (the env calls `components`/`__call__`)."""

    def __init__(self, reward):
        self.reward, self.seconds = reward, 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def __call__(self, *args):
        return self._timed(self.reward, *args)

    def components(self, *args):
        return self._timed(self.reward.components, *args)

    def __getattr__(self, name):
        return getattr(self.reward, name)


def algo_overrides(algo: str, assignments: list[str], images_per_epoch: int) -> dict:
    """`--set` options that apply to `algo` (`KEY=VALUE` where it has the field, `ALGO.KEY=VALUE` for it)."""
    cls = ALGORITHMS[algo].Config
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {"images_per_epoch": images_per_epoch}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE or ALGO.KEY=VALUE")
        owner, dot, name = key.rpartition(".")
        if dot and owner not in ALGORITHMS:
            raise SystemExit(f"--set {item!r}: unknown algorithm {owner!r}; expected one of {sorted(ALGORITHMS)}")
        if (owner and owner != algo) or name not in fields:
            if owner == algo:
                raise SystemExit(f"--set {item!r}: {algo} has no option {name!r}; expected one of {sorted(fields)}")
            continue
        out[name] = parse_text(cls, name, value, label=f"--set {item}")
    return out


def measure(algo: str, a: argparse.Namespace, sample_rate) -> dict:
    overrides = algo_overrides(algo, a.set, a.images_per_epoch)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = TrainConfig(algo=algo, model=a.model, reward=a.reward, images=a.images + a.images_per_epoch,
                              num_steps=a.train_num_steps or a.num_steps, out=tmp, progress=False, grid_every=0,
                              kl_samples=a.kl_samples, algo_overrides=overrides)
            trainer = Trainer(cfg)
        except ValueError as e:  # e.g. FPO on an ε-model, train_fraction on NFT
            return {"algo": algo, "error": str(e)}
        trainer.train_epoch()  # warm-up
        before = sample_rate()
        reward = trainer.env.reward_fn = TimedReward(trainer.env.reward_fn)
        trainer.phase_times = {}
        start = time.perf_counter()
        while trainer.images_seen < a.images + a.images_per_epoch:
            trainer.train_epoch()
        total = time.perf_counter() - start
        phases = dict(trainer.phase_times)
        phases["rollout"] -= reward.seconds
        phases["reward"] = reward.seconds
        trainer.folder.release()
    sampling = (before + sample_rate()) / 2  # sampling right before and after: the ratio holds on a busy machine
    rate = a.images / total
    return {"algo": algo, "options": overrides, "images_per_s": rate, "sampling_images_per_s": sampling,
            "x_sampling": rate / sampling,
            "seconds": total, "phase_share": {k: v / total for k, v in phases.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-flow")
    p.add_argument("--reward", default=None, help="reward name (default: the model's task reward, TASK_REWARDS)")
    p.add_argument("--num-steps", type=int, default=None, help="sampler steps evaluated (default: the model's)")
    p.add_argument("--train-num-steps", type=int, default=None, help="rollout steps (default: --num-steps)")
    p.add_argument("--images", type=int, default=512, help="images measured per algorithm (after a warm-up epoch)")
    p.add_argument("--images-per-epoch", type=int, default=BATCH)
    p.add_argument("--algos", nargs="+", default=sorted(ALGORITHMS), choices=sorted(ALGORITHMS))
    p.add_argument("--kl-samples", type=int, default=TrainConfig.kl_samples,
                   help="images per epoch of the logged KL-to-base diagnostic")
    p.add_argument("--set", action="append", default=[], metavar="[ALGO.]KEY=VALUE")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = p.parse_args(argv)
    if a.reward is None:
        if a.model not in TASK_REWARDS:
            raise SystemExit(f"--model {a.model!r} has no task reward here; pass --reward NAME")
        a.reward = TASK_REWARDS[a.model]
    if a.images % a.images_per_epoch:
        raise SystemExit(f"--images {a.images}: expected a multiple of --images-per-epoch {a.images_per_epoch}")
    from diffenv import DiffusionSteerVectorEnv

    env = DiffusionSteerVectorEnv(num_envs=BATCH, model=a.model, num_steps=a.num_steps, reward=a.reward)
    generate(BATCH, env=env)  # warm-up

    def sample_rate() -> float:
        return a.images / generate(a.images, env=env).wall_time_s

    first = sample_rate()
    steps = env.cfg.num_steps or env.backend.default_num_steps
    print(f"model={a.model} reward={a.reward} eval steps={steps} rollout steps={a.train_num_steps or steps} "
          f"images={a.images} images/epoch={a.images_per_epoch} torch_threads={torch.get_num_threads()} "
          f"kl_samples={a.kl_samples} set={a.set}")
    print(f"{'':10s} {'images/s':>9s} {'x sampling':>11s}   " + " ".join(f"{k:>8s}" for k in (*PHASES, "reward")))
    print(f"{'sampling':10s} {first:9.1f} {1.0:11.2f}   (each ratio: to sampling right before and after it)")
    rows = []
    for algo in a.algos:
        row = measure(algo, a, sample_rate)
        rows.append(row)
        if "error" in row:
            print(f"{algo:10s} {'n/a':>9s}  ({row['error']})")
            continue
        share = " ".join(f"{row['phase_share'].get(k, 0.0):8.0%}" for k in (*PHASES, "reward"))
        print(f"{algo:10s} {row['images_per_s']:9.1f} {row['x_sampling']:11.2f}   {share}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"model": a.model, "reward": a.reward, "num_steps": steps,
                                      "train_num_steps": a.train_num_steps or steps, "images": a.images,
                                      "images_per_epoch": a.images_per_epoch, "kl_samples": a.kl_samples, "set": a.set,
                                      "torch_threads": torch.get_num_threads(), "sampling_images_per_s": first,
                                      "algos": rows}, indent=2))


if __name__ == "__main__":
    main()
