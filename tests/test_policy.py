"""DiffusionPolicy: LoRA on the frozen denoiser, the env's own per-step Gaussian, save/load."""

from __future__ import annotations

import pytest
import torch

from agents import DiffusionPolicy
from diffenv import DiffusionSteerVectorEnv
from diffenv.models.lora import adapter_disabled


def perturb_lora(policy, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def eps_policy():
    return DiffusionPolicy("digits-eps", num_steps=4)


def test_fresh_adapter_equals_base_and_only_lora_trains(eps_policy):
    x, c = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    k = torch.tensor([0, 1, 2])
    with adapter_disabled(eps_policy.denoiser):
        base = eps_policy.model_output(x, k, c)
    torch.testing.assert_close(eps_policy.model_output(x, k, c), base, atol=0, rtol=0)
    trainable = {n for n, p in eps_policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(eps_policy.trainable_parameters()) == len(trainable)


@pytest.mark.parametrize("model", ["digits-eps", "digits-flow"])
def test_policy_log_prob_equals_env_transition_log_prob(model):
    policy = DiffusionPolicy(model, num_steps=4)
    perturb_lora(policy)
    env = DiffusionSteerVectorEnv(num_envs=3, reward=None, seed=0, **policy.env_kwargs())  # noise mode, tuned model
    obs, _ = env.reset(seed=0)
    gen = torch.Generator().manual_seed(1)
    for k in range(3):
        x, c, idx = obs["latent"], obs["condition"], env.step_index.clone()
        eps = torch.randn(x.shape, generator=gen)
        obs, *_ = env.step(eps)
        std = policy.sampler.stds[k]
        expected = torch.distributions.Normal(0.0, std.double()).log_prob((std * eps).double()).flatten(1).sum(1)
        got = policy.log_prob(obs["latent"], x, idx, c)
        torch.testing.assert_close(got.double(), expected, atol=2e-3, rtol=1e-5)
    assert torch.equal(env.sampler.model_timesteps, policy.sampler.model_timesteps)


def test_reference_output_ignores_the_adapter():
    policy = DiffusionPolicy("digits-flow", num_steps=4)
    x, c, k = torch.randn(2, 1, 8, 8), torch.tensor([4, 5]), torch.tensor([0, 3])
    before = policy.model_output(x, k, c)
    perturb_lora(policy)
    assert not torch.allclose(policy.model_output(x, k, c), before)
    torch.testing.assert_close(policy.model_output(x, k, c, reference=True), before, atol=0, rtol=0)


def test_lora_save_load_roundtrip_is_bitwise(tmp_path):
    policy = DiffusionPolicy("digits-eps", num_steps=4)
    perturb_lora(policy, seed=3)
    path = policy.save_lora(tmp_path / "lora.safetensors")
    fresh = DiffusionPolicy("digits-eps", num_steps=4, lora_path=path)
    x, c, k = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])
    assert torch.equal(policy.model_output(x, k, c), fresh.model_output(x, k, c))


def test_bad_lora_files(tmp_path):
    policy = DiffusionPolicy("digits-eps", num_steps=2, lora_rank=4)
    path = policy.save_lora(tmp_path / "r4.safetensors")
    with pytest.raises(ValueError, match="different rank"):
        DiffusionPolicy("digits-eps", num_steps=2, lora_rank=8).load_lora(path)
    with pytest.raises(ValueError, match="trained on model 'digits-eps'"):
        DiffusionPolicy("digits-flow", num_steps=2, lora_rank=4).load_lora(path)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        policy.load_lora(corrupt)
    with pytest.raises(FileNotFoundError):
        policy.load_lora(tmp_path / "missing.safetensors")


def test_merge_lora_keeps_outputs_and_removes_the_adapter_cost():
    from diffenv.models.lora import merge_lora

    policy = DiffusionPolicy("digits-eps", num_steps=4)
    perturb_lora(policy, seed=5)
    x, c, k = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])
    before = policy.model_output(x, k, c)
    assert merge_lora(policy.denoiser) > 0
    torch.testing.assert_close(policy.model_output(x, k, c), before, atol=1e-4, rtol=1e-4)
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in policy.denoiser.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.merged for m in layers)  # the forward skips the adapter matmuls
