"""Training throughput per algorithm vs pure sampling, measured in one run (issue #3).

    python benchmarks/train_throughput.py [--model digits-flow] [--num-steps 3] [--images 512]

For each algorithm: images/s of `Trainer.train_epoch` (collect → reward → prepare → update) over
`--images` images after one warm-up epoch, next to images/s of plain sampling (`generate`, the same
model, steps and batch of 64) and the ratio. Algorithms use their default configs with
images_per_epoch = 64.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from agents.algos import ALGORITHMS
from agents.trainer import TrainConfig, Trainer
from diffenv.sampling import generate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-flow")
    p.add_argument("--num-steps", type=int, default=3)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--algos", nargs="+", default=sorted(ALGORITHMS))
    a = p.parse_args(argv)
    generate(64, batch_size=64, model=a.model, num_steps=a.num_steps, reward="digit_classifier")  # warm-up
    sample = generate(a.images, batch_size=64, model=a.model, num_steps=a.num_steps, reward="digit_classifier")
    sample_rate = a.images / sample.wall_time_s
    print(f"model={a.model} num_steps={a.num_steps} images={a.images} batch=64 torch_threads={torch.get_num_threads()}")
    print(f"{'':10s} {'images/s':>9s} {'x sampling':>11s}")
    print(f"{'sampling':10s} {sample_rate:9.1f} {1.0:11.2f}")
    for algo in a.algos:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                trainer = Trainer(TrainConfig(algo=algo, model=a.model, num_steps=a.num_steps, images=a.images + 64,
                                              out=tmp, progress=False, grid_every=0,
                                              algo_overrides={"images_per_epoch": 64}))
            except ValueError as e:  # e.g. FPO on an ε-model
                print(f"{algo:10s} {'n/a':>9s}  ({e})")
                continue
            trainer.train_epoch()  # warm-up
            start = time.perf_counter()
            while trainer.images_seen < a.images + 64:
                trainer.train_epoch()
            rate = a.images / (time.perf_counter() - start)
        print(f"{algo:10s} {rate:9.1f} {rate / sample_rate:11.2f}")


if __name__ == "__main__":
    main()
