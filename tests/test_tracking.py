"""`--logger`: TensorBoard, W&B (offline) and MLflow get log.csv's scalars and the grids (agents/tracking.py)."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from agents.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

#: two epochs of 16 images on digits-flow, 2 steps, a probe at epoch 1 and 2, a grid every epoch
TRAIN = ["train", "--algo", "grpo", "--model", "digits-flow", "--num-steps", "2", "--set", "images_per_epoch=16",
         "--set", "group_size=4", "--no-progress", "--grid-every", "1", "--probe-every", "2", "--probe-images", "20"]


def train(out, images=32, *extra):
    return main([*TRAIN, "--images", str(images), "--out", str(out), *extra])


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_scalars(tracked: dict[str, dict[int, float]], rows: list[dict[str, str]]):
    """Every log.csv cell is in the tracker under its column, at step images_seen (float32 in TensorBoard)."""
    for row in rows:
        step = int(row["images_seen"])
        for column, text in row.items():
            if text == "":
                continue
            assert tracked[column][step] == pytest.approx(float(text), rel=1e-6, abs=1e-6), (column, step)


def tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    return acc, scalars


def test_tensorboard_gets_every_log_csv_scalar_and_the_grids(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert train(run, 32, "--logger", "tensorboard") == 0
    rows = read_log(run / "log.csv")
    assert len(rows) == 2 and "probe_reward" in rows[0] and "probe_judge_accuracy" in rows[0]
    acc, scalars = tensorboard_scalars(run / "tracking" / "tensorboard")
    assert set(scalars) == set(rows[0])  # every column, nothing else
    assert_same_scalars(scalars, rows)
    grids = acc.Images("grid")
    assert [g.step for g in grids] == [16, 32] and grids[0].width >= 1200
    assert "config" in "".join(acc.Tags()["tensors"])  # the run's TrainConfig as text


def test_a_tracked_run_resumes_bit_for_bit_like_an_untracked_one(tmp_path):
    """Logging draws no random numbers: an untracked run to 32 images and a tracked one stopped at 16 and
    resumed give the same LoRA and the same log.csv (but for the wall time)."""
    pytest.importorskip("tensorboard")
    assert train(tmp_path / "plain", 32) == 0
    assert train(tmp_path / "tracked", 16, "--logger", "tensorboard") == 0
    assert train(tmp_path / "tracked", 32, "--logger", "tensorboard", "--resume") == 0
    a, b = (tmp_path / name for name in ("plain", "tracked"))
    assert (a / "lora.safetensors").read_bytes() == (b / "lora.safetensors").read_bytes()
    strip = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in read_log(a / "log.csv")]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time_s"} for r in read_log(b / "log.csv")]
    _, scalars = tensorboard_scalars(b / "tracking" / "tensorboard")  # both sessions' epochs, one run
    assert sorted(scalars["reward_mean"]) == [16, 32]
    assert not (a / "tracking").exists()  # csv (the default) adds nothing to the run folder


def test_wandb_offline_run_holds_the_log(tmp_path, monkeypatch):
    """Offline W&B: what reaches `Run.log` is log.csv's rows, and the offline run folder holds them and the grids
    (wandb >= 0.2x keeps the .wandb file in its Go core's format: checked for the keys, values checked at `log`)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_log = wandb.Run.log
    monkeypatch.setattr(wandb.Run, "log", lambda self, data, *a, **k: logged.append(dict(data)) or real_log(
        self, data, *a, **k))
    run = tmp_path / "run"
    assert train(run, 32, "--logger", "wandb") == 0
    rows = read_log(run / "log.csv")
    scalars: dict[str, dict[int, float]] = {}
    for payload in logged:
        for k, v in payload.items():
            if isinstance(v, float):
                scalars.setdefault(k, {})[payload["step"]] = v
    assert set(rows[0]) <= set(scalars)
    assert_same_scalars(scalars, rows)
    (offline,) = (run / "tracking" / "wandb").glob("offline-run-*")
    assert offline.name.endswith((run / "tracking" / "wandb_run_id").read_text().strip())
    (records,) = offline.glob("run-*.wandb")
    assert all(column.encode() in records.read_bytes() for column in rows[0])
    assert len(list((offline / "files" / "media" / "images").glob("grid_*.png"))) == 2


def test_mlflow_run_holds_the_log(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    assert train(run, 32, "--logger", "mlflow") == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run / 'tracking' / 'mlflow.db'}")
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    rows = read_log(run / "log.csv")
    tracked = {k: {m.step: m.value for m in client.get_metric_history(found.info.run_id, k)} for k in rows[0]}
    assert_same_scalars(tracked, rows)


@pytest.mark.parametrize("kind", ["tensorboard", "wandb", "mlflow"])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(kind, command, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    argv = ([*TRAIN, "--images", "16", "--out", str(tmp_path / "run")] if command == "train"
            else ["compare", "--quick", "--out", str(tmp_path / "cmp")])
    assert main([*argv, "--logger", kind]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"pip install 'diffusion-steer[{kind}]'" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cmp").exists()  # refused before any work


def test_comparison_figures_and_results_go_to_the_summary_run(tmp_path):
    pytest.importorskip("tensorboard")
    from PIL import Image

    from agents.benchmark.compare import Comparison
    from agents.tracking import TrackerSpec

    out = tmp_path / "cmp"
    comparison = Comparison([], out, progress=False, tracker=TrackerSpec("tensorboard"))
    Image.new("RGB", (1200, 600), "white").save(out / "frontier.png")
    (out / "results.md").write_text("# RL vs CFG\n")
    comparison.track_outputs()
    acc, _ = tensorboard_scalars(out / "tracking" / "tensorboard")
    assert acc.Tags()["images"] == ["frontier"] and acc.Images("frontier")[0].width == 1200
    assert any("results" in t for t in acc.Tags()["tensors"])
