"""The `shapes` model ladder: train UNet variants (steps, width, prompt dropout) on the packaged autoencoder and
measure each one's guidance regime, to pick a model where CFG is needed (target: w = 1 roughly 20–65 %, best CFG
≥ +15 points, single objects ≥ 80 % at the best CFG).

    python benchmarks/shapes_ladder.py --device cuda --jobs 7 --out runs/ladder      # all candidates, in parallel
    python benchmarks/shapes_ladder.py --only w64-s1500 --threads 2                  # one, on the CPU (slow)

Each candidate runs `python -m retrain.train_shapes --stage unet` (seed 0, its own work folder with a copy
of the packaged VAE) and then `benchmarks/shapes_regime.py` on the folder it wrote (1,000 images per weight, 20
steps, seed 7). Rows land in `OUT/<name>.json` as they are measured; the table printed at the end reads
those files, so a run cut short still reports what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from diffenv.models.shapes import SHAPES_DIR

# name -> train_shapes flags
CANDIDATES = {
    "w64-s1000": ["--unet-steps", "1000"],
    "w64-s1500": ["--unet-steps", "1500"],
    "w64-s2500": ["--unet-steps", "2500"],
    "w64-s2500-drop0.2": ["--unet-steps", "2500", "--prompt-dropout", "0.2"],
    "w32-s1500": ["--unet-steps", "1500", "--unet-channels", "32", "64"],
    "w32-s2500": ["--unet-steps", "2500", "--unet-channels", "32", "64"],
    "w32-s4500": ["--unet-steps", "4500", "--unet-channels", "32", "64"],
    # captions replaced by random training prompts with probability cn (retrain.train_shapes.noisy_captions)
    "w64-s3000-cn0.3": ["--unet-steps", "3000", "--caption-noise", "0.3"],
    "w64-s4000-cn0.3": ["--unet-steps", "4000", "--caption-noise", "0.3"],
    "w64-s3000-cn0.5": ["--unet-steps", "3000", "--caption-noise", "0.5"],
    "w64-s4000-cn0.5": ["--unet-steps", "4000", "--caption-noise", "0.5"],
}
WEIGHTS = ["1", "1.5", "2", "3", "4", "5", "7.5"]


def command(name: str, a) -> str:
    work = a.work / name
    train = [sys.executable, "-m", "retrain.train_shapes", "--stage", "unet", "--work", str(work),
             "--out", str(work / "pipe"), "--device", a.device, "--threads", str(a.threads), *CANDIDATES[name]]
    regime = [sys.executable, "benchmarks/shapes_regime.py", "--path", str(work / "pipe"), "--device", a.device,
              "--threads", str(a.threads), "--n", str(a.n), "--weights", *WEIGHTS, "--json",
              str(a.out / f"{name}.json")]
    return " ".join(train) + f" > {work}/train.log 2>&1 && " + " ".join(regime) + f" > {work}/regime.log 2>&1"


def summary(out: Path) -> list[str]:
    lines = ["| candidate | w=1 | best w | best | gain (points) | single @best | relation @best |", "|---" * 7 + "|"]
    for f in sorted(out.glob("*.json")):
        rows = json.loads(f.read_text())
        base = next((r for r in rows if r["guidance_scale"] == 1), None)
        best = max(rows, key=lambda r: r["judge_accuracy"])
        if base is None:
            continue
        lines.append(f"| {f.stem} | {base['judge_accuracy']:.3f} | {best['guidance_scale']:g}"
                     f"{'' if len(rows) == len(WEIGHTS) else f' ({len(rows)} of {len(WEIGHTS)} w)'} | "
                     f"{best['judge_accuracy']:.3f} | {100 * (best['judge_accuracy'] - base['judge_accuracy']):+.1f} | "
                     f"{best.get('judge_acc_single_train', float('nan')):.3f} | "
                     f"{best.get('judge_acc_relation_train', float('nan')):.3f} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), default=None, help="candidates to run")
    p.add_argument("--device", default="cpu", help="torch device of training and sampling")
    p.add_argument("--jobs", type=int, default=1, help="candidates run at once")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per candidate")
    p.add_argument("--n", type=int, default=1000, help="images per guidance weight")
    p.add_argument("--work", type=Path, default=Path("runs/shapes_ladder"), help="candidates' work folders")
    p.add_argument("--out", type=Path, default=Path("runs/shapes_ladder/results"), help="JSON rows per candidate")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    names = a.only or list(CANDIDATES)
    for name in names:
        (a.work / name).mkdir(parents=True, exist_ok=True)
        if not (a.work / name / "vae").is_dir():
            shutil.copytree(SHAPES_DIR / "vae", a.work / name / "vae")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1"}
    start, running, queue = time.perf_counter(), {}, list(names)
    while queue or running:
        while queue and len(running) < a.jobs:
            name = queue.pop(0)
            running[name] = subprocess.Popen(command(name, a), shell=True, env=env)
        time.sleep(2)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                print(f"{name}: exit {proc.returncode} at {time.perf_counter() - start:.0f} s", flush=True)
                del running[name]
    print("\n".join(summary(a.out)))


if __name__ == "__main__":
    main()
