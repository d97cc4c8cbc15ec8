"""Does the embedded `shapes` model need guidance? Prompt accuracy by the held-out judge vs the CFG weight.

    python benchmarks/shapes_regime.py                 # 1,000 images per weight, 20 DDIM steps, seed 7
    python benchmarks/shapes_regime.py --weights 1 --lora runs/shapes_grpo/lora.safetensors   # a tuned model
    python benchmarks/shapes_regime.py --path runs/train_shapes_small/pipe --device cuda     # another trained folder

Images: the `eval` prompt set of the shapes model (50 prompts over every kind, 20 images each; binding and
relation prompts from the training *and* held-out splits), the same initial noise for every weight. Prints a
Markdown table: overall judge accuracy, per kind (train prompts), held-out binding/relation, the verifier
reward, within-prompt diversity, NFE and ms/image.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffenv.metrics import shapes_metrics
from diffenv.models import load_backend, load_tuned_backend
from diffenv.sampling import generate

COLUMNS = [("judge_accuracy", "overall"), ("judge_acc_single_train", "single"),
           ("judge_acc_counting_train", "counting"), ("judge_acc_binding_train", "binding"),
           ("judge_acc_relation_train", "relation"), ("judge_acc_binding_heldout", "binding (held-out)"),
           ("judge_acc_relation_heldout", "relation (held-out)"), ("reward_mean", "verifier reward"),
           ("within_prompt_distance", "within-prompt distance")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5],
                   help="guidance scales (1 = no CFG)")
    p.add_argument("--n", type=int, default=1000, help="images per weight")
    p.add_argument("--num-steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--seed", type=int, default=7, help="noise seed (the same for every weight)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--lora", default=None, help="a trainer LoRA, merged into the UNet (same protocol, same noise)")
    p.add_argument("--path", type=Path, default=None,
                   help="a pipeline folder written by `python -m retrain.train_shapes --out` (default: the "
                        "packaged one)")
    p.add_argument("--device", default="cpu", help="torch device of sampling (the judge runs on the CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    kwargs = {"path": a.path} if a.path is not None else {}
    backend = (load_tuned_backend("shapes", a.lora, device=a.device, **kwargs) if a.lora
               else load_backend("shapes", device=a.device, **kwargs))
    print(f"shapes model{f' {a.path}' if a.path else ''}, {a.n} images per weight over the `eval` prompts, "
          f"{a.num_steps} steps, seed {a.seed}, {a.threads} threads, {a.device}"
          + (f", LoRA {a.lora} (merged)" if a.lora else "") + "\n")
    print("| w | " + " | ".join(label for _, label in COLUMNS) + " | NFE | ms/image |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    rows = []
    for w in a.weights:
        res = generate(a.n, seed=a.seed, model=backend, reward="shapes_verifier", num_steps=a.num_steps,
                       guidance_scale=w, condition_set="eval", warmup=True, device=a.device)
        row = {"guidance_scale": w, "reward_mean": float(res.rewards.mean()),
               **shapes_metrics(res.images, res.conditions, backend.condition_names)}
        rows.append(row)
        if a.json is not None:
            a.json.write_text(json.dumps(rows, indent=1) + "\n")
        cells = " | ".join(f"{row.get(k, float('nan')):.3f}" for k, _ in COLUMNS)
        print(f"| {w:g} | {cells} | {res.nfe_per_image:g} | {1e3 * res.seconds_per_image:.2f} |", flush=True)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
