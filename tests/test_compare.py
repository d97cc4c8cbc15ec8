"""`diffenv compare --quick`: every output file and column appears; metrics behave."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from agents.benchmark.compare import load_tasks, overoptimisation_flag
from diffenv.metrics import frechet_distance, gaussian_stats, image_metrics

ROOT = Path(__file__).parents[1]
#: the digits tasks of examples/compare.toml (the shapes task's 20-step RL runs are too slow for a smoke run)
DIGITS = ["--tasks", "eps-classifier-10", "flow-classifier-3", "flow-classifier-jpeg-3"]


@pytest.mark.slow
def test_quick_comparison_writes_every_output(tmp_path):
    from agents.cli import main

    assert main(["compare", "--config", str(ROOT / "examples" / "compare.toml"), "--out", str(tmp_path), *DIGITS,
                 "--quick", "--no-progress"]) == 0
    for name in ("results.csv", "results.md", "reward_vs_images.png", "frontier.png", "curves_flow-classifier-3.png",
                 "grids_eps-classifier-10.png", "grids_flow-classifier-3.png"):
        assert (tmp_path / name).is_file(), name
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    kinds = {r["kind"] for r in rows}
    assert kinds == {"cfg", "best_of_n", "rl", "selected"}  # selected: the checkpoint chosen on the probe set
    for col in ("reward_mean", "judge_accuracy", "judge_log_prob", "fd", "class_variance", "nfe_per_image",
                "ms_per_image"):
        assert all(r[col] != "" for r in rows), col
    ratio = {r["entry"]: float(r["time_vs_base"]) for r in rows if r["task"] == "eps-classifier-10"}
    assert ratio["cfg w=1"] == 1.0 and all(v > 0 for v in ratio.values())  # one interleaved timing pass
    nfe = {r["entry"]: float(r["nfe_per_image"]) for r in rows if r["task"] == "eps-classifier-10"}
    assert nfe["cfg w=1"] == 10 and nfe["cfg w=3"] == 20 and nfe["best-of-2"] == 20
    log = list(csv.DictReader((tmp_path / "runs" / "flow-classifier-3" / "grpo" / "seed0" / "log.csv").open()))
    assert "probe_judge_accuracy" in log[0] and "probe_fd" in log[0]
    md = (tmp_path / "results.md").read_text()
    assert "best CFG" in md and "matches CFG's best judge accuracy" in md and "| grpo | " in md
    # resumable: a second run reuses the cache and the snapshots
    before = (tmp_path / "results.csv").read_text()
    assert main(["compare", "--config", str(ROOT / "examples" / "compare.toml"), "--out", str(tmp_path), *DIGITS,
                 "--quick", "--no-progress"]) == 0
    assert (tmp_path / "results.csv").read_text() == before


def test_frechet_distance_maths():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    mu, sigma = gaussian_stats(a)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    # shifted mean: FD = |d|^2; scaled covariance N(0, s^2 I) vs N(0, I): d (s - 1)^2
    assert frechet_distance(mu + 2.0, sigma, mu, sigma) == pytest.approx(12.0, rel=1e-9)
    eye = torch.eye(3, dtype=torch.float64)
    assert frechet_distance(torch.zeros(3), 4 * eye, torch.zeros(3), eye) == pytest.approx(3.0)


def test_image_metrics_on_real_digits_and_noise():
    from diffenv.data import load_digits_split, to_unit

    x, y = load_digits_split("test")
    real = image_metrics(to_unit(x), y)
    noise = image_metrics(torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)), y)
    assert real["judge_accuracy"] > 0.97 and noise["judge_accuracy"] < 0.3
    assert real["fd"] < noise["fd"] / 10


def test_overoptimisation_flag(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,images_seen,probe_reward,probe_judge_log_prob,probe_fd\n"
                   "1,64,0.80,-0.20,10.0\n2,128,,,\n3,192,0.95,-0.40,11.0\n")
    assert "judge log-prob -0.200->-0.400" in overoptimisation_flag(log)
    log.write_text("epoch,images_seen,probe_reward,probe_judge_log_prob,probe_fd\n1,64,0.80,-0.20,10.0\n"
                   "3,192,0.95,-0.18,10.5\n")
    assert overoptimisation_flag(log) == ""


def test_bad_compare_configs(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[task]]\nname = "t"\nalgos = ["ddpo", "ppo9"]\n')
    with pytest.raises(ValueError, match=r"unknown algos \['ppo9'\]"):
        load_tasks(cfg)
    cfg.write_text('[[task]]\nname = "t"\nlearning_rate = 1\n')
    with pytest.raises(ValueError, match=r"unknown task keys \['learning_rate'\]"):
        load_tasks(cfg)
    cfg.write_text('eval_images = 5\n')
    with pytest.raises(ValueError, match="no \\[\\[task\\]\\]"):
        load_tasks(cfg)
    with pytest.raises(FileNotFoundError):
        load_tasks(tmp_path / "missing.toml")
    cfg.write_text('algo_overrides = 3\n[[task]]\nname = "t"\n')
    with pytest.raises(TypeError, match=r"task 't': algo_overrides=3: expected a dict"):
        load_tasks(cfg)
    for text in ('[algo_overrides]\ngrpo = 5\n[[task]]\nname = "t"\n',
                 '[[task]]\nname = "t"\nalgo_overrides = { grpo = 5 }\n'):
        cfg.write_text(text)
        with pytest.raises(TypeError, match=r"task 't': algo_overrides.grpo=5: expected a table of options"):
            load_tasks(cfg)


def test_task_algo_overrides_update_the_shared_ones_per_algorithm(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[algo_overrides.grpo]\nlr = 1e-3\nminibatch_size = 48\n[algo_overrides.nft]\nlr = 2e-3\n'
                   '[[task]]\nname = "a"\n[task.algo_overrides.grpo]\nkl_coef = 0.1\nlr = 3e-4\n'
                   '[task.algo_overrides.fdfo]\neta = 0.5\n[[task]]\nname = "b"\n')
    a, b = load_tasks(cfg)
    assert a.algo_overrides == {"grpo": {"lr": 3e-4, "minibatch_size": 48, "kl_coef": 0.1}, "nft": {"lr": 2e-3},
                                "fdfo": {"eta": 0.5}}
    assert b.algo_overrides == {"grpo": {"lr": 1e-3, "minibatch_size": 48}, "nft": {"lr": 2e-3}}


def test_seed_selection_keeps_the_order_and_names_a_missing_seed(tmp_path):
    """`--seeds` splits one config's runs across processes sharing an --out (the cache keys hold the seed)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('seeds = [0, 1, 2]\n[[task]]\nname = "a"\n[[task]]\nname = "b"\nseeds = [1, 2, 3]\n')
    assert [t.seeds for t in load_tasks(cfg, seeds=[2, 1])] == [[1, 2], [1, 2]]
    assert [t.seeds for t in load_tasks(cfg)] == [[0, 1, 2], [1, 2, 3]]
    with pytest.raises(ValueError, match=r"task 'b' has no training seeds \[0\]; expected some of \[1, 2, 3\]"):
        load_tasks(cfg, seeds=[0])


@pytest.mark.parametrize("name", ["../../../x", "/tmp/x", "a/b", "..", ""])
def test_task_names_cannot_leave_the_output_folder(tmp_path, name):
    from agents.benchmark.compare import Comparison, Task

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[task]]\nname = "{name}"\nalgos = ["grpo"]\n')
    with pytest.raises(ValueError, match=r"task name=.*: expected a non-empty name without '/'"):
        load_tasks(cfg)
    with pytest.raises(ValueError, match=r"task name="):  # the Python API checks too, before any work
        Comparison([Task(name=name, algos=["grpo"])], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compare_config_seeds_and_names(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[task]]\nname = "t"\nseeds = ["../x"]\n')
    with pytest.raises(ValueError, match=r"seeds \['\.\./x'\] are not ints"):
        load_tasks(cfg)
    cfg.write_text('[[task]]\nname = "t"\n[[task]]\nname = "t"\n')
    with pytest.raises(ValueError, match=r"task names \['t', 't'\] repeat"):
        load_tasks(cfg)


class _Payload:
    """Unpickling this runs code: it writes `marker` (what a crafted `ppo.zip` could do with os.system)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def malicious_sb3_zip(path: Path, marker: Path) -> Path:
    """An SB3 save file whose `data` entry carries a cloudpickle payload, as `PPO.load` reads it."""
    import base64
    import json
    import pickle
    import zipfile

    blob = base64.b64encode(pickle.dumps(_Payload(marker))).decode()
    data = {"policy_class": {":type:": "<class 'type'>", ":serialized:": blob}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data", json.dumps(data))
    return path


def sb3_task(budgets):
    from agents.benchmark.compare import Task

    return Task(name="t", model="digits-flow", num_steps=3, algos=["sb3_ppo"], budgets=budgets, seeds=[0],
                algo_overrides={"sb3_ppo": dict(num_envs=4, batch_size=12, n_epochs=1, chunk_images=4, lora_rank=2)})


def test_the_malicious_zip_runs_code_under_ppo_load(tmp_path):
    """The attack the compare tests guard against is real: SB3's own loader executes the payload."""
    from stable_baselines3 import PPO

    marker = tmp_path / "marker"
    with pytest.raises(Exception):
        PPO.load(malicious_sb3_zip(tmp_path / "ppo.zip", marker), device="cpu")
    assert marker.read_text() == "pwned"


def test_compare_never_unpickles_a_run_folders_ppo_zip(tmp_path, monkeypatch):
    from agents.benchmark.compare import Comparison
    from agents.benchmark.learners import SB3_STATE

    monkeypatch.setenv("SB3_LOGDIR", str(tmp_path / "sb3_default_log"))  # where SB3's default logger would write

    task, marker = sb3_task([4]), tmp_path / "marker"
    cmp = Comparison([task], tmp_path / "out", progress=False)
    run = cmp.run_dir(task, "sb3_ppo", 0)
    run.mkdir(parents=True)
    malicious_sb3_zip(run / "ppo.zip", marker)
    with pytest.raises(ValueError, match=r"ppo\.zip is a Stable-Baselines3 pickle .* never loaded"):
        cmp.train(task, "sb3_ppo", 0)  # a folder with only an SB3 zip: refused, not resumed from it
    assert not marker.exists()

    (run / "ppo.zip").unlink()
    cmp.train(task, "sb3_ppo", 0)  # trains to 4 images, keeping a weights-only state
    assert (run / "lora_4.safetensors").is_file() and not (run / "ppo.zip").exists()
    with open(run / SB3_STATE, "rb") as f:  # safetensors: an 8-byte header length, then a JSON header
        assert f.read(9)[8:] == b"{"
    malicious_sb3_zip(run / "ppo.zip", marker)
    task2 = sb3_task([4, 8])
    Comparison([task2], tmp_path / "out", progress=False).train(task2, "sb3_ppo", 0)  # resumes at 4 images
    assert not marker.exists()
    log = list(csv.DictReader((run / "log.csv").open()))
    assert [int(r["images_seen"]) for r in log] == [4, 8]  # continued from the saved counters
    assert (run / "lora_8.safetensors").is_file()
    assert not (tmp_path / "sb3_default_log").exists()  # no stray SB3 log folder per learn() call


def test_task_selection_and_the_shapes_task_config():
    tasks = load_tasks(ROOT / "examples" / "compare.toml", names=["shapes-verifier-20"])
    assert [t.name for t in tasks] == ["shapes-verifier-20"]
    assert tasks[0].model == "shapes" and tasks[0].eval_conditions == "eval" and "fpo" not in tasks[0].algos
    with pytest.raises(ValueError, match="no \\[\\[task\\]\\] named \\['nope'\\]"):
        load_tasks(ROOT / "examples" / "compare.toml", names=["nope"])


def test_shapes_metrics_on_rendered_images():
    """The shapes protocol on rendered images: the judge finds them correct, per kind and split, and the
    within-prompt distance is 0 for copies and positive for different layouts."""
    from diffenv.metrics import shapes_metrics
    from diffenv.tasks import task_protocol
    from rewards import shapes_task as task

    prompts = task.model_prompts()
    chosen = [prompts.index(p) for p in task.eval_prompts()] * 2  # two images per eval prompt
    images, _ = task.render([prompts[c] for c in chosen], seed=3)
    x, c = torch.from_numpy(images), torch.tensor(chosen)
    row = shapes_metrics(x, c)
    assert row["judge_accuracy"] >= 0.95
    assert {k for k in row if k.startswith("judge_acc_")} == {
        "judge_acc_single_train", "judge_acc_counting_train", "judge_acc_binding_train",
        "judge_acc_binding_heldout", "judge_acc_relation_train", "judge_acc_relation_heldout"}
    assert row["within_prompt_distance"] > 0.05
    copies = torch.cat([x[:50], x[:50]])
    assert shapes_metrics(copies, c)["within_prompt_distance"] == 0.0
    assert task_protocol("shapes").diversity == "within_prompt_distance" and task_protocol("sd:/x") is None


def grpo_task(budgets):
    from agents.benchmark.compare import Task

    return Task(name="t", model="digits-flow", num_steps=2, algos=["grpo"], budgets=budgets, seeds=[0], probe_every=0,
                algo_overrides={"grpo": dict(images_per_epoch=8, group_size=4, minibatch_size=8)})


@pytest.mark.parametrize("algo", ["grpo", "sb3_ppo"])
def test_compare_locks_every_run_folder(tmp_path, algo):
    """A run folder another process holds is refused, an SB3 run's too (two compares on one --out trained the
    same SB3 run and doubled its log.csv rows)."""
    from agents.benchmark.compare import Comparison
    from agents.runfolder import RunError, RunFolder

    task = sb3_task([4]) if algo == "sb3_ppo" else grpo_task([8])
    cmp = Comparison([task], tmp_path / "out", progress=False)
    other = RunFolder(cmp.run_dir(task, algo, 0))
    other.lock()  # as a second `diffenv compare` on the same --out would
    try:
        with pytest.raises(RunError, match="is in use by another run"):
            cmp.train(task, algo, 0)
    finally:
        other.release()
    assert not list(other.path.glob("lora_*")) and not (other.path / "log.csv").exists()
    cmp.train(task, algo, 0)
    assert len(list(csv.DictReader((other.path / "log.csv").open()))) == 1


@pytest.mark.parametrize("algo", ["grpo", "sb3_ppo"])
def test_a_failed_snapshot_write_leaves_no_torn_file(tmp_path, monkeypatch, algo):
    """Per-budget LoRA snapshots are written whole or not at all (temp file, fsync, rename); compare then redoes
    the snapshot (a torn copy was refused and could not be repaired)."""
    import errno
    import os

    import agents.runfolder as runfolder
    from agents.benchmark.compare import Comparison
    from agents.runfolder import RunError
    from torn_writes import TornFile

    real_open = open

    def fail(_f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return TornFile(f, fail) if Path(path).name == "lora_4.safetensors.tmp" else f

    task = sb3_task([4]) if algo == "sb3_ppo" else grpo_task([4])
    if algo == "grpo":
        task.algo_overrides["grpo"].update(images_per_epoch=4, minibatch_size=4)
    cmp = Comparison([task], tmp_path / "out", progress=False)
    run = cmp.run_dir(task, algo, 0)
    monkeypatch.setattr(runfolder, "open", open_, raising=False)
    with pytest.raises(RunError, match=r"disk full while writing LoRA snapshot .*lora_4.safetensors"):
        cmp.train(task, algo, 0)
    monkeypatch.undo()
    assert not (run / "lora_4.safetensors").exists() and not list(run.glob("*.tmp"))
    cmp.train(task, algo, 0)
    assert (run / "lora_4.safetensors").is_file()
