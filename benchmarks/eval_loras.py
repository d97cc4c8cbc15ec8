"""Score LoRA files on a compare task's test set, exactly as `diffenv compare` scores its entries, without
retraining anything: each LoRA is merged into the task's model and sampled at guidance 1 on the task's eval set
(`agents.benchmark.evaluation.eval_model`: eval_images, eval_seed, eval_conditions, num_steps), and its row is
compare's (`entry_metrics`). Runs trained with `diffenv train` and the task's settings are scored this way.

    python benchmarks/eval_loras.py --config examples/shapes_best.toml --out scores.json \\
        runs/a/lora.safetensors runs/b/lora_probe_2048.safetensors

Prints one line per LoRA (judge accuracy and diversity where the task has them) and writes every row to --out.
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
    a = p.parse_args(argv)

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
    for path in a.loras:
        start = time.perf_counter()
        row = entry_metrics(eval_model(task, load_tuned_backend(task.model, path), 1.0), task)
        rows[str(path)] = row
        shown = ["reward_mean"] + (["judge_accuracy", protocol.diversity] if protocol is not None else [])
        print(f"{path}: " + ", ".join(f"{k} {row[k]:.4f}" for k in shown)
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    print(f"wrote {a.out} ({len(rows)} LoRAs, task {task.name!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
