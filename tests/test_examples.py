"""Every example runs end to end in `--smoke` mode (a subprocess, as a user would run it)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["torchrl_ppo_diffusion", "torchrl_ppo_noise", "sb3_ppo_diffusion", "sb3_sac_noise", "cleanrl_style"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_smoke(name):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for when in ("before", "after"):
        match = re.search(rf"reward {when}\s*:\s*([0-9.]+)", proc.stdout)
        assert match, proc.stdout
        assert 0.0 <= float(match.group(1)) <= 1.0


@pytest.mark.parametrize("config", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_every_compare_config_validates(config):
    """Every shipped `diffenv compare --config` file loads: keys, types, ranges and budgets checked before any work."""
    from agents.benchmark.compare import load_tasks

    tasks = load_tasks(config)
    assert tasks and all(t.seeds and t.budgets and t.eval_images >= 2 for t in tasks)


def test_sweep_runs_a_grid_reads_its_probe_curves_and_reuses_finished_runs(tmp_path):
    """benchmarks/sweep.py end to end on a tiny grid: one run per grid point, the CFG reference on the probe set, a
    table row per point; a second call trains nothing (finished runs are reused) and a bad --grid is refused."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sweep.py"), "--algo", "grpo", "--model", "digits-flow",
           "--num-steps", "3", "--images", "32", "--set", "images_per_epoch=16", "group_size=4", "minibatch_size=16",
           "--grid", "lr=1e-3,3e-4", "--probe-every", "1", "--probe-images", "16", "--cfg-scales", "1", "1.5",
           "--jobs", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "sweep.md").read_text()
    assert "| lr=1e-3 |" in table and "| lr=3e-4 |" in table and "best: w=" in table
    assert "Training wall time of this invocation:" in table and "(2 runs, 2 jobs" in table
    logs = sorted(out.glob("*/log.csv"))
    assert [p.parent.name for p in logs] == ["lr=1e-3_seed0", "lr=3e-4_seed0"]
    # "mean, 2nd half": the probes after half the budget (here the one at 32 images; the other is at 16)
    summary = {r["point"]: r for r in csv.DictReader((out / "sweep.csv").open())}
    for log in logs:
        probes = {int(r["images_seen"]): float(r["probe_judge_accuracy"]) for r in csv.DictReader(log.open())
                  if r["probe_judge_accuracy"]}
        assert sorted(probes) == [16, 32]
        assert float(summary[log.parent.name.removesuffix("_seed0")]["score_late"]) == pytest.approx(probes[32])
    stamps = [p.stat().st_mtime_ns for p in logs]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "done:" not in proc.stdout  # nothing retrained
    assert [p.stat().st_mtime_ns for p in logs] == stamps
    assert "Every run was reused from an earlier invocation" in (out / "sweep.md").read_text()
    bad = subprocess.run(cmd[:cmd.index("--grid")] + ["--grid", "lr", "--out", str(tmp_path / "bad")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--grid: expected KEY=V1,V2,..., got 'lr'" in bad.stderr


def _run_gpu_check(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_check_runs_every_check_on_tiny_sizes_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py's code paths (env overhead, syncs, training vs sampling, the doubling search, the
    CUDA tests, the table and the JSON) on the CPU in `--quick` mode, so the GPU run works the first time."""
    import json

    out = tmp_path / "gpu.json"
    proc = _run_gpu_check("--device", "cpu", "--quick", "--algos", "grpo", "fpo", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"date", "device_name", "torch", "env_overhead", "host_syncs", "training", "largest_batch",
            "cuda_tests"} <= set(result)
    assert {(r["model"], r["batch"]) for r in result["env_overhead"]} == {("digits-eps", 4), ("shapes", 4)}
    assert all(r["native_over_bare"] > 0 for r in result["env_overhead"])
    training = {r["what"]: r for r in result["training"]}
    assert training["sampling"]["x_sampling"] == 1.0 and training["grpo"]["images_per_s"] > 0
    assert training["fpo"]["images_per_s"] is None and "flow" in training["fpo"]["note"]  # no shapes flow model
    assert [r["largest_batch"] for r in result["largest_batch"]] == [4, 4]
    assert proc.stdout.count("| env overhead |") == 2 and f"wrote {out}" in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_gpu_check_without_cuda_says_so_and_exits_0():
    proc = _run_gpu_check(timeout=120)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
