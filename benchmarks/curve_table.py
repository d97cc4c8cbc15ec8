"""Validation learning curves of several run groups side by side, per image budget (mean ± std over seeds).

    python benchmarks/curve_table.py --group full=runs/sweep/A/*_seed* --group quarter=runs/sweep/B/*_seed* \\
        --images 512 1024 2048 --out docs/results/levers.md

Each `--group NAME=GLOB` is a set of run folders (one per seed, e.g. the runs of one `benchmarks/sweep.py` grid
point). For every budget in `--images` the table gives each group's mean over seeds of the probe (validation)
judge accuracy, diversity and reward at the last probe at or below that budget, the mean probe judge accuracy of
all probes up to it (the area under the learning curve: learning per image, less noisy than one 200-image probe),
and the training wall time. Only validation probes are read: for choosing configurations, never for test numbers.
"""

from __future__ import annotations

import argparse
import csv
import glob
from pathlib import Path

import numpy as np

KEYS = {"judge": "probe_judge_accuracy", "reward": "probe_reward"}


def probes(run: Path, diversity: str) -> list[dict[str, float]]:
    with open(run / "log.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("probe_judge_accuracy")]
    return [{"images": int(r["images_seen"]), "judge": float(r["probe_judge_accuracy"]),
             "reward": float(r["probe_reward"]), "diversity": float(r.get(f"probe_{diversity}") or "nan"),
             "wall": float(r["wall_time_s"])} for r in rows]


def at_budget(curve: list[dict], images: int) -> dict | None:
    """The last probe at or below `images`, with the mean judge score of every probe up to it; None if the run
    has not reached `images`."""
    upto = [p for p in curve if p["images"] <= images]
    if not upto or curve[-1]["images"] < images:
        return None
    return {**upto[-1], "auc": float(np.mean([p["judge"] for p in upto]))}


def fmt(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(groups: dict[str, list[Path]], budgets: list[int], diversity: str) -> list[str]:
    curves = {name: [probes(r, diversity) for r in runs] for name, runs in groups.items()}
    lines = [f"| images | group | seeds | judge (last probe) | judge (mean of probes so far) | {diversity} | reward "
             "| train s |", "|---|---|---|---|---|---|---|---|"]
    for images in budgets:
        for name, runs in curves.items():
            points = [p for p in (at_budget(c, images) for c in runs) if p is not None]
            lines.append(f"| {images} | {name} | {len(points)}/{len(runs)} | {fmt([p['judge'] for p in points])} | "
                         f"{fmt([p['auc'] for p in points])} | {fmt([p['diversity'] for p in points])} | "
                         f"{fmt([p['reward'] for p in points])} | "
                         f"{np.mean([p['wall'] for p in points]):.0f} |" if points else
                         f"| {images} | {name} | 0/{len(runs)} | — | — | — | — | — |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", action="append", required=True, metavar="NAME=GLOB")
    p.add_argument("--images", type=int, nargs="+", required=True)
    p.add_argument("--diversity", default="within_prompt_distance", help="probe diversity column (digits: fd)")
    p.add_argument("--out", type=Path, default=None, help="also write the table (Markdown) here")
    a = p.parse_args(argv)
    groups = {}
    for item in a.group:
        name, sep, pattern = item.partition("=")
        runs = sorted(Path(r) for r in glob.glob(pattern) if (Path(r) / "log.csv").is_file())
        if not sep or not runs:
            raise SystemExit(f"--group {item!r}: expected NAME=GLOB matching run folders with a log.csv")
        groups[name] = runs
    lines = table(groups, a.images, a.diversity)
    print("\n".join(lines))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
