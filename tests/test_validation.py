"""One validation layer (`diffenv.validation`): env kwargs, algorithm options, TrainConfig, CLI flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.algos import DDPOConfig, FDFOConfig, GRPOConfig, make_algorithm_config
from agents.trainer import TrainConfig, Trainer
from diffenv.config import EnvConfig
from diffenv.validation import check_device, parse_assignments, parse_bool

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    "kwargs, err, message",
    [
        (dict(dense_reward="no"), TypeError, "dense_reward='no': expected a bool (True or False)"),
        (dict(share_noise="maybe"), TypeError, "share_noise='maybe': expected a bool"),
        (dict(conditions=5), TypeError, "conditions=5: expected condition ids (e.g. [3, 7])"),
        (dict(seed=2**70), ValueError, f"seed={2**70}: expected an int in [0, 2**63 - 1] or None"),
        (dict(num_steps=2.5), TypeError, "num_steps=2.5: expected an int >= 1"),
        (dict(eta=float("nan")), ValueError, "eta=nan: expected a float >= 0"),
        (dict(action_bound=0), ValueError, "action_bound=0: expected a float > 0"),
        (dict(device="cdua"), ValueError, "device='cdua': not a torch device; expected 'cpu', 'cuda'"),
    ],
)
def test_env_kwargs_are_type_and_range_checked(kwargs, err, message):
    with pytest.raises(err) as e:
        EnvConfig(**kwargs)
    assert message in str(e.value)


def test_env_kwargs_are_normalised():
    cfg = EnvConfig(eta=1, conditions=(3, 7), seed=np.int64(5), action_bound=float("inf"))
    assert cfg.eta == 1.0 and isinstance(cfg.eta, float) and cfg.conditions == [3, 7] and type(cfg.seed) is int


@pytest.mark.parametrize(
    "cls, overrides, message",
    [
        (GRPOConfig, dict(group_size=0), "group_size=0: expected an int >= 1"),
        (GRPOConfig, dict(minibatch_size=0), "minibatch_size=0: expected an int >= 1"),
        (GRPOConfig, dict(inner_epochs=0), "inner_epochs=0: expected an int >= 1"),
        (DDPOConfig, dict(clip_range=-1), "clip_range=-1: expected a float > 0"),
        (GRPOConfig, dict(lr="abc"), "lr='abc': expected a float in (0, 1e+30]"),
        (DDPOConfig, dict(reinforce="no"), "reinforce='no': expected a bool"),
        (FDFOConfig, dict(group_size=1), "group_size=1: expected an int >= 2"),  # a subclass narrows the range
    ],
)
def test_algorithm_options_are_checked(cls, overrides, message):
    with pytest.raises((TypeError, ValueError)) as e:
        cls(**overrides)
    assert message in str(e.value)


def test_set_values_parse_strictly_from_text():
    assert parse_assignments(GRPOConfig, ["lr=1e-4", "group_size=4", "share_noise=no"]) == \
        {"lr": 1e-4, "group_size": 4, "share_noise": False}  # "no" is False, not a truthy string
    assert parse_assignments(FDFOConfig, ["share_noise=YES"]) == {"share_noise": True}
    cases = {"lr=abc": "--set lr=abc: expected a float in (0, 1e+30]",
             "group_size=1.5": "--set group_size=1.5: expected an int",
             "share_noise=maybe": "--set share_noise=maybe: expected a bool (true/1/yes/on or false/0/no/off)",
             "lr": "--set lr: expected KEY=VALUE", "learning_rate=1": "unknown grpo option 'learning_rate'"}
    for text, message in cases.items():
        with pytest.raises(ValueError) as e:
            parse_assignments(GRPOConfig, [text], owner="grpo")
        assert message in str(e.value)
    assert [parse_bool(w) for w in ("true", "1", "on", "False", "0", "off")] == [True] * 3 + [False] * 3


@pytest.mark.parametrize("field, value, message", [("grid_every", -1, "grid_every=-1: expected an int >= 0"),
                                                    ("probe_every", -2, "probe_every=-2: expected an int >= 0"),
                                                    ("seed", 2**70, "expected an int in [0, 2**63 - 1]"),
                                                    ("progress", "no", "progress='no': expected a bool")])
def test_train_config_fields_are_checked(field, value, message):
    cfg = TrainConfig(out="unused")
    setattr(cfg, field, value)
    with pytest.raises((TypeError, ValueError)) as e:
        cfg.validate()
    assert message in str(e.value)


def test_device_errors_say_why(monkeypatch):
    assert check_device("cpu") == "cpu"
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(ValueError, match="CUDA is not available in this torch build"):
        check_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        check_device("cdua")


def test_resume_with_a_default_set_value_is_the_same_run(tmp_path):
    small = {"images_per_epoch": 16, "group_size": 4, "minibatch_size": 16}

    def cfg(images, **extra):
        return TrainConfig(algo="grpo", model="digits-flow", num_steps=2, images=images, out=str(tmp_path), seed=0,
                           progress=False, grid_every=0, algo_overrides={**small, **extra})

    Trainer(cfg(16)).train()
    with pytest.raises(ValueError, match=r"grpo.max_grad_norm: checkpoint 1.0 vs now 2.0"):
        Trainer(cfg(32, max_grad_norm=2.0), resume=True)
    default = make_algorithm_config("grpo").max_grad_norm
    resumed = Trainer(cfg(32, max_grad_norm=default), resume=True)  # values compare, not whether a key was given
    assert resumed.images_seen == 16


@pytest.mark.parametrize("argv, message", [
    (["sample", "--device", "cdua"], "argument --device: 'cdua': not a torch device"),
    (["train", "--algo", "grpo", "--images", "64", "--out", "{tmp}/r", "--set", "lr=abc"],
     "diffenv train: error: --set lr=abc: expected a float in (0, 1e+30]"),
])
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "agents.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


def test_small_eval_sets_work_and_tiny_ones_are_refused():
    from agents.benchmark.compare import Task
    from diffenv.metrics import image_metrics

    metrics = image_metrics(torch.rand(10, 1, 8, 8), torch.arange(10))  # one image per class: no class variance
    assert np.isnan(metrics["class_variance"]) and np.isfinite(metrics["fd"])
    with pytest.raises(ValueError, match="task 't': eval_images=1: expected an int >= 2"):
        Task(name="t", eval_images=1).validate()
    with pytest.raises(ValueError, match=r"task 't': grpo budget=100: expected a multiple of images_per_epoch=64"):
        Task(name="t", algos=["grpo"], budgets=[100]).validate()
