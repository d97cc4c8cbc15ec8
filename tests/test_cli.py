"""The `diffenv` command line: sample, train, sample --lora, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from agents.cli import main


def test_sample_writes_npz_grid_and_prints_figures(tmp_path, capsys):
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    rc = main(["sample", "--model", "digits-eps", "--guidance-scale", "3", "--num-steps", "3", "--n", "30",
               "--seed", "0", "--out", str(out), "--grid", str(grid), "--batch-size", "16", "--judge", "digit_judge"])
    assert rc == 0
    data = np.load(out)
    assert data["images"].shape == (30, 1, 8, 8) and data["images"].dtype == np.float32
    assert data["images"].min() >= 0 and data["images"].max() <= 1
    assert data["conditions"].shape == (30,) and data["conditions"].dtype == np.int64
    assert grid.is_file() and grid.stat().st_size > 100
    text = capsys.readouterr().out
    assert "mean reward (digit_classifier):" in text and "NFE per image: 6" in text and "wall time:" in text
    assert "judge accuracy (digit_judge):" in text


def test_sample_is_reproducible(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for path in (a, b):
        assert main(["sample", "--num-steps", "2", "--n", "8", "--seed", "5", "--out", str(path)]) == 0
    assert np.array_equal(np.load(a)["images"], np.load(b)["images"])


def test_train_then_sample_with_lora(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--algo", "grpo", "--model", "digits-flow", "--num-steps", "2", "--images", "16",
               "--out", str(run), "--set", "images_per_epoch=16", "--set", "group_size=4", "--no-progress"])
    assert rc == 0 and (run / "lora.safetensors").is_file() and (run / "log.csv").is_file()
    assert "grpo: 1 epoch(s), 16 images" in capsys.readouterr().out
    out = tmp_path / "tuned.npz"
    assert main(["sample", "--model", "digits-flow", "--num-steps", "2", "--n", "8", "--lora",
                 str(run / "lora.safetensors"), "--out", str(out)]) == 0
    assert np.load(out)["images"].shape == (8, 1, 8, 8)
    assert main(["sample", "--model", "digits-eps", "--num-steps", "2", "--n", "8", "--lora",
                 str(run / "lora.safetensors")]) == 2
    assert "trained on model 'digits-flow'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--model", "digits-epz"], "unknown model 'digits-epz'"),
        (["sample", "--reward", "nope"], "unknown reward 'nope'"),
        (["sample", "--sampler", "euler"], "unknown sampler 'euler'"),
        (["train", "--algo", "grpo", "--images", "0", "--out", "x"], "--images must be a positive budget, got 0"),
        (["train", "--algo", "grpo", "--images", "8", "--out", "{tmp}/r", "--reward", "nope"], "unknown reward"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["sample", "--n", "0"], ["sample", "--guidance-scale", "-1"],
                                  ["train", "--algo", "ppo9", "--images", "8", "--out", "x"]])
def test_argparse_rejects_bad_flags(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err
