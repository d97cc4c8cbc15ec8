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


def sampler(model: str, num_steps: int | None, reward, batch: int = BATCH, device: str = "cpu"):
    """A function `images -> images/s` of plain sampling (`generate` on one env, the same model, steps and batch),
    after one warm-up batch."""
    from diffenv import DiffusionSteerVectorEnv

    env = DiffusionSteerVectorEnv(num_envs=batch, model=model, num_steps=num_steps, reward=reward, device=device)
    generate(batch, env=env)  # warm-up
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)

    def rate(images: int) -> float:
        sync()
        return images / generate(images, env=env).wall_time_s  # `generate` returns its images on the CPU

    rate.env = env
    return rate


def sampling_rate(model: str, num_steps: int | None, images: int, reward="digit_classifier", batch: int = BATCH,
                  device: str = "cpu") -> float:
    """Images/s of plain sampling after a warm-up batch."""
    return sampler(model, num_steps, reward, batch, device)(images)


def profile_training(algo: str, model: str, num_steps: int | None, images: int, reward="digit_classifier",
                     batch: int = BATCH, device: str = "cpu", overrides: dict | None = None,
                     kl_samples: int = TrainConfig.kl_samples, after_warmup=None) -> dict:
    """Images/s of `Trainer.train_epoch` over `images` images after one warm-up epoch (the algorithm's defaults,
    images_per_epoch = `batch`, then `overrides`), the seconds they took and each phase's share of them
    (`agents.trainer.PHASES`, the reward split out of the rollout). `after_warmup()` runs before the timing starts.
    ValueError where the algorithm does not apply (e.g. FPO on an ε-model, train_fraction on NFT)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(TrainConfig(algo=algo, model=model, reward=reward, images=images + batch,
                                      num_steps=num_steps, out=tmp, progress=False, grid_every=0, device=device,
                                      kl_samples=kl_samples,
                                      algo_overrides={"images_per_epoch": batch, **(overrides or {})}))
        try:
            trainer.train_epoch()  # warm-up
            if after_warmup is not None:
                after_warmup()
            reward_fn = trainer.env.reward_fn = TimedReward(trainer.env.reward_fn)
            trainer.phase_times = {}
            sync = torch.cuda.synchronize if trainer.policy.device.type == "cuda" else (lambda: None)
            sync()
            start = time.perf_counter()
            while trainer.images_seen < images + batch:
                trainer.train_epoch()
            sync()
            total = time.perf_counter() - start
        finally:
            trainer.folder.release()
    phases = dict(trainer.phase_times)
    phases["rollout"] -= reward_fn.seconds
    phases["reward"] = reward_fn.seconds
    return {"images_per_s": images / total, "seconds": total, "phase_share": {k: v / total for k, v in phases.items()}}


def training_rate(algo: str, model: str, num_steps: int | None, images: int, reward="digit_classifier",
                  batch: int = BATCH, device: str = "cpu", overrides: dict | None = None) -> float:
    """Images/s of training (`profile_training`)."""
    return profile_training(algo, model, num_steps, images, reward, batch, device, overrides)["images_per_s"]


def measure(algo: str, a: argparse.Namespace, sample_rate) -> dict:
    """One algorithm's row: its profile, and its ratio to sampling timed right before and right after it."""
    overrides = algo_overrides(algo, a.set, a.images_per_epoch)
    before = []
    try:
        row = profile_training(algo, a.model, a.train_num_steps or a.num_steps, a.images, a.reward,
                               a.images_per_epoch, overrides=overrides, kl_samples=a.kl_samples,
                               after_warmup=lambda: before.append(sample_rate(a.images)))
    except ValueError as e:
        return {"algo": algo, "error": str(e)}
    sampling = (before[0] + sample_rate(a.images)) / 2  # the ratio holds on a busy machine
    return {"algo": algo, "options": overrides, **row, "sampling_images_per_s": sampling,
            "x_sampling": row["images_per_s"] / sampling}


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
    sample_rate = sampler(a.model, a.num_steps, a.reward)
    first = sample_rate(a.images)
    steps = sample_rate.env.sampler.num_steps
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
