"""Stable-Baselines3 integration (agents/integrations/sb3.py): env checks, the VecEnv, PPO/SAC, the diffusion policy."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.vec_env import VecMonitor

from agents.integrations.sb3 import (DiffusionActorCriticPolicy, DiffusionSteerSB3VecEnv, DiffusionStepDistribution,
                        latent_policy_kwargs, make_single_env)

K = 3
ENV = dict(model="digits-flow", num_steps=K)


@pytest.mark.parametrize("mode", ["noise", "initial_noise", "latent"])
def test_sb3_check_env_single(mode):
    env = make_single_env(action_mode=mode, seed=0, **ENV)
    assert np.isfinite(env.action_space.low).all() and np.isfinite(env.action_space.high).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "latent looks like an image" / "normalise the action box" hints
        check_env(env)


def test_sb3_ppo_takes_the_registered_env_as_is():
    """`PPO("MultiInputPolicy", gym.make("DiffusionSteer-v0"))` with no extra arguments, and a short run."""
    import gymnasium as gym

    import diffenv  # noqa: F401  (registers the env)

    PPO("MultiInputPolicy", gym.make("DiffusionSteer-v0"))  # SB3's defaults (n_steps=2048): build only
    env = gym.make("DiffusionSteer-v0", **ENV)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "normalise the action box" / "latent looks like an image" hints
        check_env(env)
    model = PPO("MultiInputPolicy", env, n_steps=2 * K, batch_size=2 * K, n_epochs=1, seed=0).learn(2 * K)
    assert model.num_timesteps == 2 * K


def test_sb3_make_vec_env_takes_the_registered_id():
    """SB3's own helper builds a DummyVecEnv of the registered env by its id, and PPO trains on it."""
    from stable_baselines3.common.env_util import make_vec_env

    import diffenv  # noqa: F401  (registers the env)

    venv = make_vec_env("DiffusionSteer-v0", n_envs=2, seed=0, env_kwargs=ENV)
    obs = venv.reset()
    assert obs["latent"].shape == (2, 1, 8, 8) and obs["condition"].shape == (2,)
    model = PPO("MultiInputPolicy", venv, n_steps=K, batch_size=2 * K, n_epochs=1, seed=0, device="cpu")
    model.learn(4 * K)
    assert model.num_timesteps == 4 * K
    assert len(model.ep_info_buffer) >= 2 and all(0.0 <= ep["r"] <= 1.0 and ep["l"] == K
                                                  for ep in model.ep_info_buffer)  # make_vec_env adds a Monitor


def test_rl_zoo_trains_with_the_shipped_hyperparameters(tmp_path):
    """The one-line RL Zoo command of README, for a few hundred steps (skipped without the optional rl_zoo3)."""
    pytest.importorskip("rl_zoo3")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "rl_zoo3.train", "--algo", "ppo", "--env", "DiffusionSteer-v0",
           "--gym-packages", "diffenv", "--conf-file", str(root / "examples" / "zoo" / "ppo.yml"),
           "-n", "384", "--seed", "0", "-f", str(tmp_path / "logs"), "--device", "cpu"]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "total_timesteps      | 384" in proc.stdout
    assert list((tmp_path / "logs" / "ppo").glob("DiffusionSteer-v0_*/DiffusionSteer-v0.zip"))


def test_infinite_bound_rejected():
    with pytest.raises(ValueError, match="finite"):
        DiffusionSteerSB3VecEnv(2, action_bound=float("inf"), **ENV)


def test_vec_env_same_step_reset_and_terminal_obs():
    venv = DiffusionSteerSB3VecEnv(4, reward=None, seed=0, **ENV)
    venv.seed(3)
    obs = first = venv.reset()
    assert obs["latent"].shape == (4, 1, 8, 8) and obs["latent"].dtype == np.float32
    assert obs["condition"].shape == (4,) and obs["timestep"].shape == (4, 1)
    for k in range(K):
        obs, reward, dones, infos = venv.step(np.zeros((4, 1, 8, 8), np.float32))
        assert reward.shape == (4,) and dones.dtype == bool
        assert dones.all() == (k == K - 1)
    for info in infos:
        term = info["terminal_observation"]
        assert term["timestep"][0] == 0.0 and term["latent"].shape == (1, 8, 8)
        assert info["TimeLimit.truncated"] is False
    np.testing.assert_allclose(obs["timestep"], 1.0)  # already the next episode's first observation
    assert not np.array_equal(obs["latent"][0], infos[0]["terminal_observation"]["latent"])
    venv.seed(3)  # one seed reproduces the whole batch
    np.testing.assert_array_equal(venv.reset()["latent"], first["latent"])
    assert not np.array_equal(venv.reset()["latent"], first["latent"])


@pytest.mark.parametrize("mode", ["noise", "initial_noise"])
def test_ppo_and_sac_on_noise_actions(mode):
    venv = VecMonitor(DiffusionSteerSB3VecEnv(8, action_mode=mode, seed=0, **ENV))
    kwargs = latent_policy_kwargs(features_dim=32, net_arch=[32])
    ppo = PPO("MultiInputPolicy", venv, policy_kwargs=kwargs, n_steps=6, batch_size=24, n_epochs=1, gamma=1.0,
              seed=0, device="cpu")
    ppo.learn(240)
    sac = SAC("MultiInputPolicy", venv, policy_kwargs=kwargs, learning_starts=48, batch_size=32, gamma=1.0,
              seed=0, device="cpu")
    sac.learn(240)
    for model in (ppo, sac):  # episodes were completed and recorded (VecMonitor → ep_info_buffer)
        assert len(model.ep_info_buffer) > 0
        assert all(0.0 <= ep["r"] <= 1.0 and ep["l"] == venv.venv.vector_env.episode_length
                   for ep in model.ep_info_buffer)


def test_diffusion_distribution_sigma_zero():
    dist = DiffusionStepDistribution(64).proba_distribution(torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.0]))
    actions = dist.sample()
    assert torch.equal(actions[1], dist.mode()[1])
    lp = dist.log_prob(actions)
    assert torch.isfinite(lp).all() and lp[1] == 0


def test_diffusion_policy_learns_saves_and_loads(tmp_path):
    venv = DiffusionSteerSB3VecEnv(8, action_mode="latent", seed=0, **ENV)
    diffusion_kwargs = dict(lora_rank=4, **ENV)
    model = PPO(DiffusionActorCriticPolicy, venv, policy_kwargs={"diffusion_kwargs": diffusion_kwargs},
                n_steps=6, batch_size=24, n_epochs=1, learning_rate=1e-3, gamma=1.0, seed=0, device="cpu")
    policy = model.policy
    lora = [p for n, p in policy.named_parameters() if "lora_" in n]
    frozen = {n: p.detach().clone() for n, p in policy.diffusion.named_parameters() if "lora_" not in n}
    assert {id(p) for g in policy.optimizer.param_groups for p in g["params"]} >= {id(p) for p in lora}
    model.learn(96)
    assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)  # the LoRA moved
    assert all(torch.equal(p, frozen[n]) for n, p in policy.diffusion.named_parameters() if "lora_" not in n)

    obs = venv.reset()
    path = tmp_path / "ppo_diffusion.zip"
    model.save(path)
    loaded = PPO.load(path, device="cpu")
    assert isinstance(loaded.policy, DiffusionActorCriticPolicy)
    a1, _ = model.predict(obs, deterministic=True)
    a2, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(a1, a2)
    fresh = PPO(DiffusionActorCriticPolicy, venv, policy_kwargs={"diffusion_kwargs": diffusion_kwargs}, device="cpu")
    assert not np.array_equal(a1, fresh.predict(obs, deterministic=True)[0])  # the reload carried the LoRA
    obs_t = {k: torch.as_tensor(v) for k, v in obs.items()}
    torch.manual_seed(0)
    actions, values, log_prob = loaded.policy(obs_t)
    assert actions.shape == (8, 1, 8, 8) and values.shape == (8, 1) and torch.isfinite(log_prob).all()
    _, lp, _ = loaded.policy.evaluate_actions(obs_t, actions.reshape(8, -1))
    torch.testing.assert_close(lp, log_prob)


def test_training_state_round_trip_is_weights_only(tmp_path):
    from agents.integrations.sb3 import load_training_state, save_training_state

    def make(lora_rank=2):
        venv = DiffusionSteerSB3VecEnv(4, action_mode="latent", seed=0, **ENV)
        return PPO(DiffusionActorCriticPolicy, venv, n_steps=3, batch_size=12, n_epochs=1, seed=0, device="cpu",
                   policy_kwargs={"diffusion_kwargs": dict(lora_rank=lora_rank, **ENV)})

    model = make()
    model.learn(12)
    path = save_training_state(model, tmp_path / "state.safetensors")
    loaded = make()
    load_training_state(loaded, path)
    assert (loaded.num_timesteps, loaded._n_updates) == (model.num_timesteps, model._n_updates) == (12, 1)
    for (name, a), b in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b), name
    saved, restored = model.policy.optimizer.state_dict()["state"], loaded.policy.optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys()
    for i in saved:
        for k in saved[i]:
            assert torch.equal(torch.as_tensor(saved[i][k]), torch.as_tensor(restored[i][k])), (i, k)
    with pytest.raises(ValueError, match="does not fit this policy"):
        load_training_state(make(lora_rank=4), path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match="is not a readable SB3 training state"):
        load_training_state(make(), tmp_path / "junk.safetensors")
