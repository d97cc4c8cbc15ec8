"""A hyperparameter sweep of one algorithm on one task, read off validation learning curves (used to
understand FDFO and to choose diversity-preserving defaults, docs/design.md §7).

    python benchmarks/sweep.py --algo fdfo --model digits-flow --num-steps 3 --images 4096 --seeds 0 1 \\
        --set noise_level=0.7 --grid lr=3e-4,1e-3 minibatch_size=256,48 --jobs 2 --out runs/sweep/fdfo_flow3

Every point of the grid (the Cartesian product of `--grid KEY=V1,V2,…`, on top of `--set` and the algorithm's
defaults) trains one run per seed with `diffenv train --probe-every … --probe-images …`, each in its own process
with one torch thread (`--jobs` at a time). The CFG reference points are sampled on the same validation probe set
(`agents.benchmark.evaluation.eval_probe`: seed 999, the trainer's probe protocol) at `--cfg-scales`. The table
reports, per grid point (mean over seeds): the last probe's judge score, diversity, reward and KL to the base, the
mean judge score over the probes of the budget's second half (steadier than one probe);
the best CFG point's judge score reached at no worse diversity (`images_to_reach`, "—" if not), and the
checkpoint `select_checkpoint` picks. Rows land in OUT/sweep.csv and OUT/sweep.md; finished runs are reused.
Only validation probes are read: this is for choosing hyperparameters, never for reporting test numbers.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def parse_grid(items: list[str]) -> list[dict[str, str]]:
    """`["lr=1e-3,3e-4", "minibatch_size=48"]` -> the Cartesian product as a list of {key: value-string}."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SystemExit(f"--grid: expected KEY=V1,V2,..., got {item!r}")
        axes.append([(key, v) for v in values.split(",")])
    return [dict(point) for point in itertools.product(*axes)] if axes else [{}]


def run_name(point: dict[str, str], seed: int) -> str:
    return "_".join(f"{k}={v}" for k, v in point.items()) + f"_seed{seed}" if point else f"default_seed{seed}"


def command(args, point: dict[str, str], seed: int, out: Path) -> list[str]:
    sets = [*args.set, *(f"{k}={v}" for k, v in point.items())]
    cmd = [sys.executable, "-m", "agents.cli", "train", "--algo", args.algo, "--model", args.model,
           "--reward", args.reward, "--images", str(args.images), "--out", str(out), "--seed", str(seed),
           "--probe-every", str(args.probe_every), "--probe-images", str(args.probe_images), "--grid-every", "0",
           "--threads", "1", "--no-progress"]
    if (out / "checkpoint.pt").exists():  # a run cut short continues exactly where it stopped
        cmd.append("--resume")
    if args.train_num_steps:  # cheaper rollouts; probes (and the CFG reference) stay at --num-steps
        cmd += ["--num-steps", str(args.train_num_steps)]
        if args.num_steps:
            cmd += ["--eval-num-steps", str(args.num_steps)]
    elif args.num_steps:
        cmd += ["--num-steps", str(args.num_steps)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def finished(out: Path, images: int) -> bool:
    log = out / "log.csv"
    if not log.exists():
        return False
    with open(log) as f:
        rows = list(csv.DictReader(f))
    return bool(rows) and int(rows[-1]["images_seen"]) >= images


def run_all(jobs: list[tuple[list[str], Path]], parallel: int) -> None:
    """Run the train commands `parallel` at a time (one torch thread each); a failed run stops the sweep."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            cmd, out = pending.pop(0)
            log = open(out.parent / f"{out.name}.out", "w")  # beside the run folder, which train wants empty
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out, log))
        time.sleep(0.5)
        for item in list(running):
            proc, out, log = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            if proc.returncode:
                for p, _, _ in running:
                    p.kill()
                raise SystemExit(f"run {out} failed (exit {proc.returncode}); see {out.parent / (out.name + '.out')}")
            print(f"done: {out.name}", flush=True)


def cfg_reference(args) -> list[dict]:
    """The CFG points on the validation probe set (cached in OUT/cfg_reference.json)."""
    import torch

    from agents.benchmark.evaluation import eval_probe
    from diffenv.tasks import task_protocol
    import rewards

    path = args.out / "cfg_reference.json"
    key = {"model": args.model, "reward": args.reward, "num_steps": args.num_steps, "probe_images": args.probe_images}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["key"] == key and [p["w"] for p in cached["points"]] == args.cfg_scales:
            return cached["points"]
    torch.set_num_threads(1)
    protocol = task_protocol(args.model)
    task = SimpleNamespace(probe_images=args.probe_images, reward=rewards.make(args.reward),
                           num_steps=args.num_steps or None)
    points = []
    for w in args.cfg_scales:
        result = eval_probe(task, args.model, guidance_scale=w)
        row = protocol.metrics(result.images, result.conditions)
        points.append({"w": w, "score": row["judge_accuracy"], "diversity": row[protocol.diversity],
                       "reward": result.rewards.mean().item()})
        print(f"cfg w={w}: judge {points[-1]['score']:.3f}, {protocol.diversity} {points[-1]['diversity']:.3f}",
              flush=True)
    path.write_text(json.dumps({"key": key, "points": points}, indent=1))
    return points


def summarise_point(runs: list[Path], best_cfg: dict, protocol) -> dict:
    from agents.benchmark.curves import images_to_reach, probe_curve, select_checkpoint

    finals, reach, selected, late = [], [], [], []
    for out in runs:
        with open(out / "log.csv") as f:
            rows = list(csv.DictReader(f))
        curve = probe_curve(rows, "probe_judge_accuracy", f"probe_{protocol.diversity}")
        probed = [r for r in rows if r.get("probe_judge_accuracy") not in ("", None)]
        last = probed[-1]
        finals.append({"score": float(last["probe_judge_accuracy"]), "diversity": float(last[f"probe_{protocol.diversity}"]),
                       "reward": float(last["probe_reward"]), "kl": float(last.get("kl_to_base") or math.nan),
                       "wall": float(rows[-1]["wall_time_s"])})
        half = max(p.images for p in curve) / 2  # one probe is noisy (200 images on shapes): the second half's mean
        late.append(float(np.mean([p.score for p in curve if p.images > half])))
        reach.append(images_to_reach(curve, best_cfg["score"], best_cfg["diversity"],
                                     protocol.diversity_lower_is_better))
        pick = select_checkpoint(curve, protocol.diversity_lower_is_better)
        selected.append((pick.images, pick.score, pick.diversity))
    mean = lambda key: float(np.mean([f[key] for f in finals]))  # noqa: E731
    got = [r for r in reach if r is not None]
    return {"score": mean("score"), "score_late": float(np.mean(late)), "diversity": mean("diversity"),
            "reward": mean("reward"), "kl": mean("kl"),
            "wall_s": mean("wall"), "reached": f"{len(got)}/{len(reach)}",
            "images_to_cfg": float(np.mean(got)) if got else math.nan,
            "selected_images": float(np.mean([s[0] for s in selected])),
            "selected_score": float(np.mean([s[1] for s in selected])),
            "selected_diversity": float(np.mean([s[2] for s in selected]))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", required=True)
    p.add_argument("--model", default="digits-flow")
    p.add_argument("--reward", default="digit_classifier")
    p.add_argument("--num-steps", type=int, default=0, help="sampler steps (0: the model's default)")
    p.add_argument("--train-num-steps", type=int, default=0,
                   help="rollout steps of training, if fewer than --num-steps (probes stay at --num-steps)")
    p.add_argument("--images", type=int, default=4096, help="training budget per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config for every grid point")
    p.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2", help="swept keys (Cartesian product)")
    p.add_argument("--probe-every", type=int, default=4, help="epochs between probes")
    p.add_argument("--probe-images", type=int, default=500)
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    from agents.benchmark.curves import no_worse
    from diffenv.tasks import task_protocol
    from agents.benchmark.report import rank_key

    protocol = task_protocol(args.model)
    if protocol is None:
        raise SystemExit(f"--model {args.model}: no evaluation protocol (expected digits-* or shapes)")
    args.out.mkdir(parents=True, exist_ok=True)
    grid = parse_grid(args.grid)
    jobs = [(command(args, point, seed, args.out / run_name(point, seed)), args.out / run_name(point, seed))
            for point in grid for seed in args.seeds]
    start = time.perf_counter()
    todo = [j for j in jobs if not finished(j[1], args.images)]
    run_all(todo, args.jobs)
    train_wall = (f"Training wall time of this invocation: {time.perf_counter() - start:.0f} s ({len(todo)} runs, "
                  f"{args.jobs} jobs, 1 thread each)." if todo else
                  "Every run was reused from an earlier invocation (training time per run: s/run).")
    points = cfg_reference(args)
    rank = rank_key(protocol)  # compare's rule for CFG's best point: judge score to 3 decimals, then diversity
    best = max(points, key=lambda q: rank({"judge_accuracy": q["score"], protocol.diversity: q["diversity"]}))

    rows = []
    for point in grid:
        summary = summarise_point([args.out / run_name(point, s) for s in args.seeds], best, protocol)
        dominated = all(summary["score"] >= q["score"]
                        and no_worse(summary["diversity"], q["diversity"], protocol.diversity_lower_is_better)
                        for q in points if q["w"] > 1)
        rows.append({"point": " ".join(f"{k}={v}" for k, v in point.items()) or "defaults", **summary,
                     "dominates_cfg": dominated})
    fields = list(rows[0])
    with open(args.out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    d = protocol.diversity
    rollout = f", rollouts at {args.train_num_steps} steps" if args.train_num_steps else ""
    lines = [f"# {args.algo} sweep on {args.model} ({args.num_steps or 'default'} steps{rollout}, reward {args.reward})",
             "",
             f"{args.images} images per run, seeds {args.seeds}, base config {' '.join(args.set) or '(defaults)'}; "
             f"validation probe set: {args.probe_images} images (seed 999) every {args.probe_every} epochs. "
             + train_wall, "",
             "CFG on the probe set: " + ", ".join(f"w={q['w']:g} {q['score']:.3f} / {q['diversity']:.2f}" for q in points)
             + f"; best: w={best['w']:g}.", "",
             f"| point | judge (last) | judge (mean, 2nd half) | {d} (last) | reward (last) | KL to base "
             f"| reached best CFG | images to CFG | selected: images, judge, {d} | dominates CFG w>1 | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = "—" if math.isnan(r["images_to_cfg"]) else f"{r['images_to_cfg']:.0f}"
        lines.append(f"| {r['point']} | {r['score']:.3f} | {r['score_late']:.3f} | {r['diversity']:.2f} "
                     f"| {r['reward']:.3f} | {r['kl']:.3g} "
                     f"| {r['reached']} | {reach} | {r['selected_images']:.0f}, {r['selected_score']:.3f}, "
                     f"{r['selected_diversity']:.2f} | {'yes' if r['dominates_cfg'] else 'no'} | {r['wall_s']:.0f} |")
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
