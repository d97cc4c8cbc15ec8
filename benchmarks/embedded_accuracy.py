"""Class accuracy of the embedded models, unguided vs CFG, judged by a classifier that is not the reward.

    python benchmarks/embedded_accuracy.py [--n 1000] [--seed 0] [--guidance 1 2 3] [--num-steps 10 3]

Prints a Markdown table: model, steps, guidance, NFE/image, judge accuracy (`digit_judge`, an MLP),
reward (`digit_classifier`, a CNN: p(c | x)), ms/image. Each row samples `n` images with balanced
conditions and the model's default sampler (DDIM η=1 for digits-eps, flow SDE a=0.7 for digits-flow).
"""

from __future__ import annotations

import argparse

import torch

import rewards
from diffenv.sampling import generate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=["digits-eps", "digits-flow"])
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--num-steps", type=int, nargs="+", default=[10, 3])
    a = p.parse_args(argv)
    judge = rewards.make("digit_judge", mode="correct")
    print(f"n={a.n} seed={a.seed} torch_threads={torch.get_num_threads()}\n")
    print("| model | steps | guidance | NFE/image | judge accuracy | reward (p(c|x)) | ms/image |")
    print("|---|---|---|---|---|---|---|")
    for model in a.models:
        for k in a.num_steps:
            for w in a.guidance:
                r = generate(a.n, seed=a.seed, model=model, reward="digit_classifier", num_steps=k, guidance_scale=w)
                acc = judge(r.images, r.conditions).mean().item()
                print(f"| {model} | {k} | {w:g} | {r.nfe_per_image:g} | {acc:.3f} | {r.rewards.mean():.3f} | "
                      f"{1e3 * r.seconds_per_image:.2f} |", flush=True)


if __name__ == "__main__":
    main()
