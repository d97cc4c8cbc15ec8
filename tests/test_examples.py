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


def test_train_throughput_reports_ratios_and_a_profile_of_each_algorithm(tmp_path):
    """benchmarks/train_throughput.py on a tiny budget: a ratio to sampling and the epoch's phase shares per
    algorithm (they add up to at most the measured time), `--set` routed per algorithm, a clear refusal for NFT."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_throughput as tt
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "tp.json"
    tt.main(["--model", "digits-flow", "--num-steps", "3", "--train-num-steps", "2", "--images", "32",
             "--images-per-epoch", "16", "--algos", "grpo", "nft", "--set", "group_size=4",
             "--set", "grpo.train_fraction=0.5", "--set", "nft.train_fraction=0.5", "--json", str(out)])
    import json

    report = json.loads(out.read_text())
    assert report["num_steps"] == 3 and report["train_num_steps"] == 2
    grpo, nft = report["algos"]
    assert grpo["options"] == {"images_per_epoch": 16, "group_size": 4, "train_fraction": 0.5}
    assert grpo["x_sampling"] > 0 and grpo["images_per_s"] == pytest.approx(32 / grpo["seconds"])
    assert set(grpo["phase_share"]) == {"rollout", "reward", "prepare", "loss", "backward", "diagnostics"}
    assert 0.5 < sum(grpo["phase_share"].values()) <= 1.0 + 1e-6
    assert "nft trains on forward-process draws" in nft["error"]
    with pytest.raises(SystemExit, match="unknown algorithm 'ppo'"):
        tt.algo_overrides("grpo", ["ppo.lr=1"], 16)
    with pytest.raises(SystemExit, match="grpo has no option 'beta'"):
        tt.algo_overrides("grpo", ["grpo.beta=1"], 16)
    assert tt.algo_overrides("grpo", ["beta=1"], 16) == {"images_per_epoch": 16}  # NFT's option: not GRPO's


def test_curve_table_reads_each_groups_probes_at_matched_budgets(tmp_path):
    """benchmarks/curve_table.py: per budget, the last probe at or below it and the mean of the probes so far, over
    the seeds that reached it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import curve_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for seed, judges in ((0, (0.2, 0.3, 0.5)), (1, (0.2, 0.4))):
        run = tmp_path / f"a_seed{seed}"
        run.mkdir()
        rows = ["images_seen,wall_time_s,probe_judge_accuracy,probe_reward,probe_fd"]
        rows += [f"{64 * (i + 1)},{10 * (i + 1)},{j},{j + 0.5},{1 - j}" for i, j in enumerate(judges)]
        rows.insert(2, "96,15,,,")  # an epoch without a probe
        (run / "log.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "t.md"
    curve_table.main(["--group", f"a={tmp_path}/a_seed*", "--images", "128", "192", "--diversity", "fd",
                      "--out", str(out)])
    lines = out.read_text().splitlines()
    assert lines[2] == "| 128 | a | 2/2 | 0.350 ± 0.050 | 0.275 ± 0.025 | 0.650 ± 0.050 | 0.850 ± 0.050 | 20 |"
    assert lines[3] == "| 192 | a | 1/2 | 0.500 | 0.333 | 0.500 | 1.000 | 30 |"
    with pytest.raises(SystemExit, match="expected NAME=GLOB"):
        curve_table.main(["--group", f"b={tmp_path}/none*", "--images", "64"])


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


@pytest.mark.usefixtures("one_thread")
def test_eval_loras_scores_a_lora_as_compare_does(tmp_path):
    """benchmarks/eval_loras.py on a run compare trained gives compare's own cached row for that LoRA."""
    import json

    from agents.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text('[[task]]\nname = "t"\nmodel = "digits-flow"\nnum_steps = 2\ncfg_scales = [1.0]\nbest_of_n = [2]\n'
                   'algos = ["grpo"]\nbudgets = [8]\nseeds = [0]\neval_images = 16\nprobe_every = 0\n'
                   '[task.algo_overrides.grpo]\nimages_per_epoch = 8\ngroup_size = 4\nminibatch_size = 8\n')
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "cmp"), "--no-progress"]) == 0
    lora = tmp_path / "cmp" / "runs" / "t" / "grpo" / "seed0" / "lora_8.safetensors"
    out = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_loras.py"), "--config", str(cfg),
                           "--out", str(out), "--threads", "1", str(lora)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text())[str(lora)]
    cached = json.loads((tmp_path / "cmp" / "cache" / "t__grpo__s0__b8.json").read_text())
    # The two processes run the same float32 networks, but their kernels may round differently (CI saw FD agree to
    # 1e-9 only): continuous metrics to a few hundred float32 eps, the 16-image accuracy to one image (a near-tie).
    for key in ("reward_mean", "fd", "class_variance"):
        assert row[key] == pytest.approx(cached[key], rel=1e-5), key
    assert row["judge_accuracy"] == pytest.approx(cached["judge_accuracy"], abs=1 / 16 + 1e-12)
    # --time: the LoRA, the base and CFG timed interleaved in one process; ratios to the base and to CFG
    timed = tmp_path / "timed.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_loras.py"), "--config", str(cfg),
                           "--out", str(timed), "--threads", "1", "--no-eval", "--time", "2", "--rounds", "1",
                           str(lora)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(timed.read_text())
    assert set(rows) == {"cfg w=1", "cfg w=2", str(lora)}
    assert rows["cfg w=1"]["time_vs_base"] == 1.0 and rows["cfg w=2"]["time_vs_cfg"] == 1.0
    assert [rows[k]["nfe_per_image"] for k in ("cfg w=1", "cfg w=2", str(lora))] == [2, 4, 2]
    assert "judge_accuracy" not in rows[str(lora)] and rows[str(lora)]["ms_per_image"] > 0
    assert rows[str(lora)]["time_vs_cfg"] == pytest.approx(rows[str(lora)]["time_vs_base"]
                                                           / rows["cfg w=2"]["time_vs_base"])
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_loras.py"), "--config", str(cfg),
                          "--out", str(timed), str(lora), "--time", "1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "CFG weights must be > 1" in bad.stderr
