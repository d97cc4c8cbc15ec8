"""Tasks (`diffenv.tasks`): a model's default reward everywhere, the agent's prompt in `info`, a model without a task
refused before any sampling, and a task of one's own registered from outside the package."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium as gym
import numpy as np
import pytest
import torch

import diffenv  # noqa: F401  (registers the env)
from agents.trainer import TrainConfig
from diffenv import DiffusionSteerVectorEnv
from diffenv.tasks import TASK_REWARD, Task, get_task, register_task, resolve_reward, task_for_model, task_protocol

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("model, reward", [("digits-eps", "digit_classifier"), ("digits-flow", "digit_classifier"),
                                           ("shapes", "shapes_verifier")])
def test_each_shipped_model_gets_its_tasks_reward(model, reward):
    assert task_for_model(model).reward == reward
    assert resolve_reward(TASK_REWARD, model) == reward
    assert TrainConfig(algo="fdfo", model=model, images=64, out="runs/x").reward == TASK_REWARD
    cfg = TrainConfig(algo="fdfo", model=model, images=64, out="runs/x")
    cfg.validate()
    assert cfg.reward == reward  # resolved by name, as the checkpoint records it


def test_shapes_env_terminates_with_the_shapes_reward_and_shows_its_prompt():
    """`gym.make(model="shapes")` with no reward: the terminal step scores with shapes_verifier (not the digits
    CNN, which refuses 32x32 RGB images), and info["prompt"] is the text of the observation's condition."""
    env = gym.make("DiffusionSteer-v0", model="shapes", num_steps=2, seed=0)
    obs, info = env.reset(seed=0)
    names = env.unwrapped.vector_env.backend.condition_names
    assert info["prompt"] == names[int(obs["condition"])]
    for _ in range(2):
        obs, reward, terminated, truncated, info = env.step(np.zeros(env.action_space.shape, np.float32))
    assert terminated and 0.0 <= reward <= 1.0
    assert "shapes_verifier" in info["reward_components"]  # with its partial-credit terms
    assert info["prompt"] == names[int(obs["condition"])]


def test_vector_env_prompts_follow_autoreset():
    """One prompt per sub-env; after an autoreset the new episodes' prompts (same_step: at once)."""
    venv = DiffusionSteerVectorEnv(num_envs=4, model="shapes", num_steps=1, seed=3, autoreset_mode="same_step",
                                   reward=None)
    names = venv.backend.condition_names
    obs, info = venv.reset(seed=3)
    assert info["prompt"].tolist() == [names[c] for c in obs["condition"].tolist()]
    for _ in range(3):
        obs, _, terminated, _, info = venv.step(torch.zeros(venv.action_space.shape))
        assert bool(terminated.all())
        assert info["prompt"].tolist() == [names[c] for c in obs["condition"].tolist()]


def test_digits_info_has_no_prompt():
    venv = DiffusionSteerVectorEnv(num_envs=2, model="digits-eps", num_steps=1, seed=0)
    _, info = venv.reset(seed=0)
    assert "prompt" not in info


def test_a_model_without_a_task_needs_a_reward_before_any_sampling(tmp_path):
    """A backend of no task (here a digits backend renamed): the env refuses the default reward at construction,
    naming the fix; an explicit reward works."""
    from diffenv.models import load_backend

    backend = load_backend("digits-eps")
    backend.name = "my-own-model"
    with pytest.raises(ValueError, match=r"'my-own-model' belongs to no task .* pass a reward: reward='NAME'"):
        DiffusionSteerVectorEnv(num_envs=2, model=backend, num_steps=1)
    DiffusionSteerVectorEnv(num_envs=2, model=backend, num_steps=1, reward="digit_classifier")
    with pytest.raises(ValueError, match="belongs to no task"):
        TrainConfig(algo="grpo", model="sd:/nowhere", images=64, out=str(tmp_path / "r")).validate()


def test_sample_cli_refuses_a_model_without_a_task_before_loading_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "agents.cli", "sample", "--model", "sd:/nowhere/model", "--n", "2",
                           "--out", str(tmp_path / "x.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "belongs to no task" in proc.stderr and "--reward NAME" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_register_task_from_outside_the_package():
    """A user's task: its model gets its reward and protocol lookup finds no benchmark protocol (none registered)."""
    task = register_task(Task("toy-digits-task", models=("toy-model",), reward="jpeg_compressibility"))
    try:
        assert get_task("toy-digits-task") is task
        assert resolve_reward(TASK_REWARD, "toy-model") == "jpeg_compressibility"
        assert task_protocol("toy-model") is None
        with pytest.raises(ValueError, match=r"model\(s\) \['shapes'\] already belong to task\(s\) \['shapes'\]"):
            register_task(Task("another", models=("shapes",), reward="shapes_judge"))
        with pytest.raises(ValueError, match="already registered"):
            register_task(Task("toy-digits-task", models=("toy-model",), reward="digit_classifier"))
    finally:
        from diffenv.tasks import TASKS

        TASKS.unregister("toy-digits-task")


def test_import_is_quiet():
    """`import diffenv` then a shapes env prints none of transformers' torchvision notices (the CLI's filters)."""
    code = ("import diffenv, gymnasium as gym; env = gym.make('DiffusionSteer-v0', model='shapes', num_steps=1); "
            "env.reset(seed=0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" not in proc.stderr, proc.stderr
