"""TorchRL integration (agents/integrations/torchrl.py): env specs, the diffusion actor, ClipPPOLoss, Collector."""

from __future__ import annotations

import pytest
import torch
from torchrl.collectors import Collector
from torchrl.envs.utils import ExplorationType, check_env_specs, set_exploration_type
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from agents.advantages import group_advantages
from agents.policy import DiffusionPolicy
from agents.integrations.torchrl import (DiffusionSteerTorchRLEnv, DiffusionStepNormal, evaluate, make_diffusion_actor,
                            make_noise_actor_critic, terminal_group_advantage)

from numerics import centring_tolerance, group_means

K = 3


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    # DDIM (ε-model): its last step has σ = 0, the case that must not give NaN log-probs
    return DiffusionPolicy("digits-eps", num_steps=K, lora_rank=4)


def latent_env(policy, n=4, **kw):
    return DiffusionSteerTorchRLEnv(n, **policy.env_kwargs(), action_mode="latent", seed=0, **kw)


@pytest.mark.parametrize("mode", ["noise", "latent", "initial_noise"])
def test_check_env_specs(mode):
    env = DiffusionSteerTorchRLEnv(3, model="digits-flow", num_steps=K, action_mode=mode, seed=0, reward=None)
    check_env_specs(env)
    assert env.batch_size == torch.Size([3])
    assert env.observation_spec["latent"].shape == (3, 1, 8, 8)


def test_bounded_noise_spec_and_seed():
    env = DiffusionSteerTorchRLEnv(2, model="digits-flow", num_steps=K, action_bound=2.0, reward=None)
    check_env_specs(env)
    assert float(env.action_spec.space.high.max()) == 2.0
    env.set_seed(7)
    a = env.reset()["latent"]
    env.set_seed(7)
    assert torch.equal(a, env.reset()["latent"])


def test_partial_reset_keeps_other_rows():
    env = DiffusionSteerTorchRLEnv(4, model="digits-flow", num_steps=K, reward=None, seed=0)
    td = env.reset()
    td = env.step(td.set("action", torch.zeros(4, 1, 8, 8)))["next"]
    mask = torch.tensor([True, False, True, False]).view(4, 1)
    out = env.reset(td.clone().set("_reset", mask))  # TorchRL passes the current state with the mask
    assert torch.equal(out["latent"][1], td["latent"][1]) and not torch.equal(out["latent"][0], td["latent"][0])
    assert torch.equal(env.vector_env.step_index, torch.tensor([0, 1, 0, 1]))


def test_step_index_from_timestep(policy):
    table = policy.sampler.obs_timesteps
    assert torch.equal(policy.sampler.step_index_of(table[:K].view(-1, 1)), torch.arange(K))
    assert policy.sampler.step_index_of(table[K:]).item() == K - 1  # terminal obs
    with pytest.raises(ValueError, match="sampler grid"):
        policy.sampler.step_index_of(torch.tensor([0.123]))


def test_distribution_sigma_zero():
    loc = torch.randn(3, 1, 8, 8)
    dist = DiffusionStepNormal(loc, torch.tensor([1.0, 0.5, 0.0]))
    x = dist.sample()
    assert torch.equal(x[2], loc[2])
    lp = dist.log_prob(x)
    assert lp.shape == (3,) and torch.isfinite(lp).all() and lp[2] == 0
    assert torch.isfinite(dist.entropy()).all()


def test_actor_log_prob_equals_policy(policy):
    env, actor = latent_env(policy), make_diffusion_actor(policy)
    torch.manual_seed(0)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        td = env.rollout(K, actor)
    flat = td.reshape(-1)  # [4 * K]
    k = policy.sampler.step_index_of(flat["timestep"])
    with torch.no_grad():
        lp = policy.log_prob(flat["action"], flat["latent"], k, flat["condition"])
    assert flat["action_log_prob"].shape == (4 * K,)
    torch.testing.assert_close(flat["action_log_prob"], lp, rtol=1e-4, atol=1e-2)  # batch jitter, see below
    assert (flat["action_log_prob"][flat["scale"] == 0] == 0).all()  # DDIM's last step
    assert torch.isfinite(flat["action_log_prob"]).all()


def test_collector_batch_and_clip_ppo_updates_only_lora(policy):
    torch.manual_seed(0)  # the actor samples with torch's global generator: same batch alone or in the file
    n, g = 8, 4
    env, actor = latent_env(policy, n, group_size=g), make_diffusion_actor(policy)
    collector = Collector(env, actor, frames_per_batch=n * K, total_frames=n * K,
                          auto_register_policy_transforms=False)
    batch = next(iter(collector))
    collector.shutdown()
    assert batch.batch_size == (n, K)
    reward = batch["next", "reward"][..., 0]
    assert (reward[:, :-1] == 0).all() and (reward[:, -1] > 0).all()
    assert batch["next", "done"][:, -1].all() and not batch["next", "done"][:, :-1].any()

    batch["advantage"] = terminal_group_advantage(batch, g)
    assert batch["advantage"].shape == (n, K, 1)
    # zero-mean per group: exact in float64; in float32 up to the rounding of the group mean of rewards
    # ≈ 1, which a near-constant group divides by std + eps ≈ 1e-4 (measured: 1e-4 to 3e-4)
    adv, groups = batch["advantage"][:, 0, 0], torch.arange(n) // g
    reward64 = reward[:, -1].double()
    adv64 = group_advantages(reward64, groups)
    scale = reward64.view(-1, g).std(1, unbiased=False).repeat_interleave(g) + 1e-4  # the default eps
    assert (group_means(adv64, groups).abs() <= centring_tolerance(adv64, reward64, groups, scale)).all()
    tol = centring_tolerance(adv, reward[:, -1], groups, scale)
    assert (group_means(adv, groups).abs() <= tol).all()
    assert ((adv - adv64).abs() <= tol.repeat_interleave(g)).all()  # float32 = float64 up to that rounding

    loss_fn = ClipPPOLoss(actor, critic_network=None, entropy_bonus=False)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    out = loss_fn(batch.reshape(-1))
    assert torch.isfinite(out["loss_objective"])
    # old = current parameters: ratio 1 up to float32 batch-size jitter of the UNet (~1e-6), which
    # DDIM's x̂0 = (x − sqrt(1−ᾱ) ε̂) / sqrt(ᾱ) amplifies ~2e4× at t = 999 (collector batches n, loss n·K)
    torch.testing.assert_close(out["mean_ratio"], torch.tensor(1.0), atol=1e-3, rtol=0)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-3)
    out["loss_objective"].backward()
    optimizer.step()
    changed = [name for name, p in policy.named_parameters() if not torch.equal(p, before[name])]
    assert changed and all("lora_" in name for name in changed)
    with torch.no_grad():  # restore the module-scoped policy
        for name, p in policy.named_parameters():
            p.copy_(before[name])


def test_noise_actor_critic_gae_ppo():
    env = DiffusionSteerTorchRLEnv(6, model="digits-flow", num_steps=K, action_bound=3.0, seed=0)
    actor, critic = make_noise_actor_critic(env, hidden=32)
    collector = Collector(env, actor, frames_per_batch=6 * K, total_frames=6 * K,
                          auto_register_policy_transforms=False)
    batch = next(iter(collector))
    collector.shutdown()
    with torch.no_grad():
        GAE(gamma=1.0, lmbda=0.95, value_network=critic)(batch)
    loss_fn = ClipPPOLoss(actor, critic, entropy_coeff=0.0)
    out = loss_fn(batch.reshape(-1))
    (out["loss_objective"] + out["loss_critic"]).backward()
    assert all(torch.isfinite(v) for v in out.values())
    # the untrained actor is the base sampler: mean ε = 0, std 1
    assert torch.equal(batch["loc"], torch.zeros_like(batch["loc"]))
    assert 0.0 <= evaluate(env, actor, seed=1, exploration=ExplorationType.DETERMINISTIC) <= 1.0
