"""docs/extending.md, end to end: a toy reward, model, algorithm and task added from outside the packages — by the
registries' decorators from this test module, and by a package's entry points — then used through `gym.make`,
`diffenv train` and `diffenv compare` exactly as the built-ins are."""

from __future__ import annotations

import csv
import os
import sys
import textwrap
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict

import diffenv  # noqa: F401  (registers the env)
import rewards
from agents.advantages import group_centred
from agents.algos import ALGORITHMS, AlgoConfig, Algorithm, register_algorithm
from agents.cli import main
from agents.rollout import transitions
from diffenv.models import MODELS, EmbeddedDigitsBackend, register_model
from diffenv.tasks import TASKS, Task, register_task
from rewards.base import CallableReward
from rewards.registry import REWARDS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------ the four toys, as a user's package writes them
def toy_brightness():
    """A reward: the mean pixel value."""
    return CallableReward(lambda images, conditions: images.mean(dim=(1, 2, 3)), name="toy_brightness")


def load_toy_digits(name: str, device="cpu") -> EmbeddedDigitsBackend:
    """A model: the shipped ε digits model under a name of its own."""
    backend = EmbeddedDigitsBackend("digits-eps", device=device)
    backend.name = name
    return backend


@dataclass
class ToyPGConfig(AlgoConfig):
    group_size: int = 4


class ToyPG(Algorithm):
    """An algorithm: REINFORCE on group-centred rewards, L = −E[A log π_θ(x_{t−1} | x_t)]."""

    name = "toy_pg"
    Config = ToyPGConfig
    reference_term = False

    def prepare(self, rollout: TensorDict) -> TensorDict:
        rollout["advantages"] = group_centred(rollout["rewards"], rollout["group_ids"])
        return transitions(rollout)

    def loss(self, items: TensorDict) -> dict:
        log_prob = self.policy.log_prob(items["next_latents"], items["latents"], items["step_index"],
                                        items["conditions"])
        return {"loss_policy": -(items["advantages"] * log_prob).mean()}


TOY_TASK = Task("toy", models=("toy-digits",), reward="toy_brightness")


@pytest.fixture
def toys():
    rewards.register("toy_brightness")(toy_brightness)
    register_model("toy-digits", load_toy_digits)
    register_algorithm(ToyPG)
    register_task(TOY_TASK)
    yield
    for registry, name in ((REWARDS, "toy_brightness"), (MODELS, "toy-digits"), (ALGORITHMS, "toy_pg"),
                           (TASKS, "toy")):
        registry.unregister(name)


# ------------------------------------------------------------------ used as the built-ins are
def test_toys_through_gym_make(toys):
    """The toy model gets the toy task's reward by default: the terminal reward is the images' brightness."""
    env = gym.make("DiffusionSteer-v0", model="toy-digits", num_steps=2, seed=0)
    env.reset(seed=0)
    for _ in range(2):
        _, reward, terminated, _, info = env.step(np.zeros(env.action_space.shape, np.float32))
    assert terminated
    assert reward == pytest.approx(float(torch.as_tensor(info["final_images"]).mean()), rel=1e-5)


def test_toys_through_diffenv_train_and_compare(toys, tmp_path):
    """`--algo toy_pg --model toy-digits` trains (the CLI's choices include the new algorithm), then `compare` runs
    the toy algorithm on the toy task from a TOML config and reports it."""
    assert main(["train", "--algo", "toy_pg", "--model", "toy-digits", "--num-steps", "2", "--images", "16",
                 "--out", str(tmp_path / "run"), "--set", "images_per_epoch=8", "--set", "minibatch_size=8",
                 "--no-progress"]) == 0
    log = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["images_seen"]) for r in log] == [8, 16] and all(r["loss_policy"] for r in log)
    cfg = tmp_path / "toy.toml"
    cfg.write_text(textwrap.dedent("""
        [[task]]
        name = "toy"
        model = "toy-digits"
        num_steps = 2
        cfg_scales = [1.0, 2.0]
        best_of_n = [2]
        algos = ["toy_pg"]
        budgets = [8]
        seeds = [0]
        eval_images = 16
        probe_every = 0
        [task.algo_overrides.toy_pg]
        images_per_epoch = 8
        minibatch_size = 8
    """))
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "cmp"), "--no-progress"]) == 0
    rows = list(csv.DictReader((tmp_path / "cmp" / "results.csv").open()))
    assert {r["entry"] for r in rows} >= {"cfg w=1", "cfg w=2", "toy_pg @8"}, rows
    assert "toy_pg" in (tmp_path / "cmp" / "results.md").read_text()


# ------------------------------------------------------------------ the same toys from a package's entry points
ENTRY_POINTS = """\
[diffusion_steer.rewards]
ep_brightness = toy_steer_plugin:brightness

[diffusion_steer.models]
ep-digits = toy_steer_plugin:load_model

[diffusion_steer.algorithms]
ep_pg = toy_steer_plugin:EntryPointPG

[diffusion_steer.tasks]
ep-task = toy_steer_plugin:TASK
"""

PLUGIN = '''
from diffenv.models import EmbeddedDigitsBackend
from diffenv.tasks import Task
from rewards.base import CallableReward
from test_extending import ToyPG


def brightness():
    return CallableReward(lambda images, conditions: images.mean(dim=(1, 2, 3)), name="ep_brightness")


def load_model(name, device="cpu"):
    backend = EmbeddedDigitsBackend("digits-eps", device=device)
    backend.name = name
    return backend


class EntryPointPG(ToyPG):
    name = "ep_pg"


TASK = Task("ep-task", models=("ep-digits",), reward="ep_brightness")
'''


def test_an_installed_packages_entry_points_register_each_kind(tmp_path, monkeypatch):
    """A distribution on sys.path declaring the four entry-point groups (as `pip install` of a package with
    `[project.entry-points."diffusion_steer.rewards"]` … writes it): each registry finds its entry by name without
    anyone importing the package, and the env uses them."""
    (tmp_path / "toy_steer_plugin.py").write_text(PLUGIN)
    info = tmp_path / "toy_steer_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-steer-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    registries = (REWARDS, MODELS, ALGORITHMS, TASKS)
    for registry in registries:  # read the entry points again, now that the package is installed
        monkeypatch.setattr(registry, "_entry_points_loaded", False)
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    assert "ep_brightness" in rewards.names() and "ep_pg" in ALGORITHMS and "ep-task" in TASKS
    assert ALGORITHMS["ep_pg"].__name__ == "EntryPointPG"
    env = gym.make("DiffusionSteer-v0", model="ep-digits", num_steps=1, seed=0)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros(env.action_space.shape, np.float32))
    assert reward == pytest.approx(float(torch.as_tensor(info["final_images"]).mean()), rel=1e-5)
    sys.modules.pop("toy_steer_plugin", None)


def test_registries_refuse_a_taken_name_and_name_the_closest():
    with pytest.raises(ValueError, match="reward 'digit_classifier' is already registered"):
        rewards.register("digit_classifier")(toy_brightness)
    with pytest.raises(ValueError, match="algorithm 'grpo' is already registered"):
        ALGORITHMS.register("grpo", ToyPG)
    with pytest.raises(ValueError, match="unknown model 'digits-epx'.*did you mean 'digits-eps'"):
        diffenv.models.load_backend("digits-epx")
    with pytest.raises(TypeError, match="expects an Algorithm subclass"):
        register_algorithm(int)
