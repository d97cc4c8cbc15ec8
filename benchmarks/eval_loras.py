"""Score LoRA files on a compare task's test set, exactly as `diffenv compare` scores its entries, without
retraining anything: each LoRA is merged into the task's model and sampled at guidance 1 on the task's eval set
(`agents.benchmark.evaluation.eval_model`: eval_images, eval_seed, eval_conditions, num_steps), and its row is
compare's (`entry_metrics`). Runs trained with `diffenv train` and the task's settings are scored this way.

    python benchmarks/eval_loras.py --config examples/shapes_best.toml --out scores.json \\
        runs/a/lora.safetensors runs/b/lora_probe_2048.safetensors

Prints one line per LoRA (judge accuracy and diversity where the task has them) and writes every row to --out.

`--time W...` also times each LoRA at guidance 1 against the base at guidance 1 and at CFG weight W, interleaved in
this one process and thread count (`agents.benchmark.timing`, compare's own pass: 64 eval conditions, rotated
rounds, median): each LoRA row gains `entry` (its path), `ms_per_image`, `time_vs_base`, `time_vs_cfg` (the ratio
to the first W) and `nfe_per_image`, and --out gains a row per timed CFG entry (`cfg w=1`, `cfg w=W`). The evaluations' own wall times are not a
comparison (they run minutes apart); these ratios are. `--no-eval` times without scoring.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("loras", nargs="+", type=Path, help="LoRA files (save_lora / a run's lora*.safetensors)")
    p.add_argument("--config", type=Path, required=True, help="compare config (TOML) whose task defines the test set")
    p.add_argument("--task", default=None, help="task name in the config (default: its only task)")
    p.add_argument("--out", type=Path, required=True, help="JSON file: {lora path: row}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--time", type=float, nargs="+", default=None, metavar="W",
                   help="CFG weights (> 1) to time every LoRA against, interleaved with the base")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default: compare's)")
    p.add_argument("--no-eval", action="store_true", help="time only (needs --time), no test-set scores")
    a = p.parse_args(argv)
    if a.time is not None and any(w <= 1 for w in a.time):
        p.error(f"--time {a.time}: CFG weights must be > 1 (the base at guidance 1 is always timed)")
    if a.no_eval and a.time is None:
        p.error("--no-eval without --time has nothing to do")

    import torch

    from agents.benchmark.compare import load_tasks
    from agents.benchmark.evaluation import entry_metrics, eval_model
    from diffenv.models import load_tuned_backend
    from diffenv.tasks import task_protocol

    if a.threads:
        torch.set_num_threads(a.threads)
    tasks = load_tasks(a.config, names=[a.task] if a.task else None)
    if len(tasks) != 1:
        raise SystemExit(f"--config {a.config} has tasks {[t.name for t in tasks]}; name one with --task")
    task = tasks[0]
    for path in a.loras:
        if not path.is_file():
            raise SystemExit(f"LoRA {path} does not exist")
    protocol = task_protocol(task.model)
    rows = {}
    for path in [] if a.no_eval else a.loras:
        start = time.perf_counter()
        row = entry_metrics(eval_model(task, load_tuned_backend(task.model, path), 1.0), task)
        rows[str(path)] = row
        shown = ["reward_mean"] + (["judge_accuracy", protocol.diversity] if protocol is not None else [])
        print(f"{path}: " + ", ".join(f"{k} {row[k]:.4f}" for k in shown)
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    if a.time is not None:
        time_entries(task, a.loras, a.time, rows, a.rounds)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    print(f"wrote {a.out} ({len(a.loras)} LoRAs, {len(rows) - len(a.loras)} timed CFG rows, task {task.name!r})")
    return 0


def time_entries(task, loras: list[Path], weights: list[float], rows: dict, rounds: int | None) -> None:
    """Time the base (guidance 1), CFG at each of `weights` and every LoRA at guidance 1 in one interleaved pass;
    set each LoRA row's ms_per_image / time_vs_base / time_vs_cfg and add a row per CFG entry (in place)."""
    from agents.benchmark import timing
    from diffenv.models import load_tuned_backend

    base = "cfg w=1"
    entries = {base: timing.sampler(task, task.model, 1.0)}
    entries |= {f"cfg w={w:g}": timing.sampler(task, task.model, w) for w in weights}
    entries |= {str(path): timing.sampler(task, load_tuned_backend(task.model, path)) for path in loras}
    seconds = timing.interleaved_seconds(entries, **({} if rounds is None else {"rounds": rounds}))
    n = min(timing.TIMING_IMAGES, task.eval_images)
    cfg = f"cfg w={weights[0]:g}"
    for key in seconds:
        rows.setdefault(key, {})["entry"] = key
        rows[key]["nfe_per_image"] = task.num_steps * (1 if key == base or key in map(str, loras) else 2)
    timing.apply_timings(list(rows.values()), {k: s / n for k, s in seconds.items()}, lambda r: r.get("entry"), base, cfg)
    for key in seconds:
        r = rows[key]
        print(f"time {key}: {r['ms_per_image']:.2f} ms/image, {r['time_vs_base']:.3f}x the base, "
              f"{r['time_vs_cfg']:.3f}x {cfg}", flush=True)

if __name__ == "__main__":
    raise SystemExit(main())
