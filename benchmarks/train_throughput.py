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


def sampling_rate(model: str, num_steps: int, images: int, reward: str = "digit_classifier", batch: int = 64,
                  device: str = "cpu") -> float:
    """Images/s of plain sampling (`generate`) after a warm-up batch."""
    kw = dict(batch_size=batch, model=model, num_steps=num_steps, reward=reward, device=device, progress=False)
    generate(batch, **kw)  # warm-up
    return images / generate(images, **kw).wall_time_s


def training_rate(algo: str, model: str, num_steps: int, images: int, reward: str = "digit_classifier",
                  batch: int = 64, device: str = "cpu", overrides: dict | None = None) -> float:
    """Images/s of `Trainer.train_epoch` (collect → reward → prepare → update) over `images` images after one
    warm-up epoch, the algorithm's default config with images_per_epoch = `batch`. ValueError where the algorithm
    does not apply (e.g. FPO on an ε-model)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(TrainConfig(algo=algo, model=model, reward=reward, num_steps=num_steps, images=images + batch,
                                      out=tmp, progress=False, grid_every=0, device=device,
                                      algo_overrides={"images_per_epoch": batch, **(overrides or {})}))
        trainer.train_epoch()  # warm-up
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        while trainer.images_seen < images + batch:
            trainer.train_epoch()
        sync()
        return images / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-flow")
    p.add_argument("--num-steps", type=int, default=3)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--algos", nargs="+", default=sorted(ALGORITHMS))
    a = p.parse_args(argv)
    sample_rate = sampling_rate(a.model, a.num_steps, a.images)
    print(f"model={a.model} num_steps={a.num_steps} images={a.images} batch=64 torch_threads={torch.get_num_threads()}")
    print(f"{'':10s} {'images/s':>9s} {'x sampling':>11s}")
    print(f"{'sampling':10s} {sample_rate:9.1f} {1.0:11.2f}")
    for algo in a.algos:
        try:
            rate = training_rate(algo, a.model, a.num_steps, a.images)
        except ValueError as e:  # e.g. FPO on an ε-model
            print(f"{algo:10s} {'n/a':>9s}  ({e})")
            continue
        print(f"{algo:10s} {rate:9.1f} {rate / sample_rate:11.2f}")


if __name__ == "__main__":
    main()
