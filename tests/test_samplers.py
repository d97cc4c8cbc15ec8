"""Sampler transitions vs the diffusers schedulers they mirror, batching over steps, exact log-probs."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffenv.samplers import (
    SAMPLERS,
    gaussian_log_prob,
    gaussian_log_prob_per_dim,
    make_sampler,
)

SHAPE = (3, 2, 4, 4)  # [B, C, H, W]
FLOW_CONFIG = dict(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).config)


def ddpm_config(prediction_type="epsilon", clip_sample=True, timestep_spacing="trailing", **extra):
    """The embedded ε-model's config by default; the arguments vary one thing at a time."""
    return dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=clip_sample,
                              prediction_type=prediction_type, timestep_spacing=timestep_spacing, **extra).config)


DISCRETE_CONFIGS = {
    "eps-clip-trailing": ddpm_config(),
    "eps-noclip-trailing": ddpm_config(clip_sample=False),
    "eps-clip-leading": ddpm_config(timestep_spacing="leading"),
    "v-clip-trailing": ddpm_config("v_prediction"),
    "v-noclip-leading": ddpm_config("v_prediction", clip_sample=False, timestep_spacing="leading"),
    "sample-noclip-trailing": ddpm_config("sample", clip_sample=False),
    "sample-clip-leading-offset": ddpm_config("sample", timestep_spacing="leading", steps_offset=1),
}
STEPS = (1, 4, 10)


def random_rollout_inputs(num_steps, seed=0, dtype=torch.float32):
    """x_T [B, C, H, W] and one random model output per step [K, B, C, H, W]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=gen, dtype=dtype), torch.randn(num_steps, *SHAPE, generator=gen, dtype=dtype)


def assert_matches(ours, reference, tol=1e-5):
    """max |ours − reference| ≤ tol, relative to the values' scale where that exceeds 1: an unclipped
    ε-model's x̂0 at t = 999 is (x − sqrt(1−ᾱ) ε)/sqrt(ᾱ) ~ 1e4 (ᾱ = 2.4e-9), where float32 rounds at
    1e-3. Measured: ≤ 4e-7 (float32) and ≤ 3.2e-10 (float64: diffusers' 1e-10-std noise at the last DDPM
    step, which we make a point mass)."""
    scale = max(1.0, reference.abs().max().item())
    assert (ours.double() - reference.double()).abs().max().item() <= tol * scale


def at_step(k, batch=SHAPE[0]):
    return torch.full((batch,), k, dtype=torch.long)


def float64_scheduler(cls, config, num_steps):
    """A diffusers scheduler whose tables are float64, so its `step` runs in float64 on float64 inputs.

    In float32 `DDIMScheduler.step` loses its direction coefficient sqrt(1 − ᾱ_prev − σ²) to cancellation
    at η = 1 (true value ~1e-4 at t = 999, float32 error ~3e-4); the reference must not carry that error.
    """
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(num_steps)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


# --------------------------------------------------------------------- transitions vs diffusers

DTYPES = (torch.float64, torch.float32)  # our sampler's dtype; the diffusers reference runs in float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("config_name", list(DISCRETE_CONFIGS))
def test_ddpm_matches_diffusers_step(config_name, num_steps, dtype):
    config = DISCRETE_CONFIGS[config_name]
    sampler = make_sampler("ddpm", config, num_steps, family="ddpm")
    scheduler = float64_scheduler(DDPMScheduler, config, num_steps)
    torch.testing.assert_close(sampler.model_timesteps, scheduler.timesteps.float())
    x, outputs = random_rollout_inputs(num_steps, dtype=torch.float64)
    ours, theirs = x.to(dtype), x
    gen_ours, gen_theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for k, t in enumerate(scheduler.timesteps):
        out = scheduler.step(outputs[k], t, theirs, generator=gen_theirs)
        # DDPMScheduler draws noise exactly when t > 0; reproduce its generator stream
        noise = torch.randn(SHAPE, generator=gen_ours, dtype=torch.float64) if t > 0 else torch.zeros(SHAPE)
        output = outputs[k].to(dtype)
        assert_matches(sampler.pred_original_sample(ours, output, at_step(k)), out.pred_original_sample)
        ours, theirs = sampler.step(ours, output, at_step(k), noise), out.prev_sample
        assert ours.dtype == dtype
        assert_matches(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("config_name", list(DISCRETE_CONFIGS))
@pytest.mark.parametrize("name,eta", [("ddim", 1.0), ("ddim", 0.3), ("ode", 0.0)])
def test_ddim_matches_diffusers_step(name, eta, config_name, num_steps, dtype):
    config = DISCRETE_CONFIGS[config_name]
    sampler = make_sampler(name, config, num_steps, family="ddpm", eta=eta)
    scheduler = float64_scheduler(DDIMScheduler, config, num_steps)
    x, outputs = random_rollout_inputs(num_steps, dtype=torch.float64)
    noises = torch.randn(num_steps, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours, theirs = x.to(dtype), x
    for k, t in enumerate(scheduler.timesteps):
        out = scheduler.step(outputs[k], t, theirs, eta=eta, variance_noise=noises[k] if eta > 0 else None)
        output = outputs[k].to(dtype)
        assert_matches(sampler.pred_original_sample(ours, output, at_step(k)), out.pred_original_sample)
        ours, theirs = sampler.step(ours, output, at_step(k), noises[k]), out.prev_sample
        assert_matches(ours, theirs)
    assert sampler.deterministic == (eta == 0 or num_steps == 1)  # the only/last step lands on x0: σ = 0


def test_float32_ddim_matches_float32_diffusers_on_the_default_config():
    """The float32 path of the embedded ε-model's sampler (clipped, so values are O(1)) vs plain diffusers."""
    config = ddpm_config()
    sampler = make_sampler("ddim", config, 10, family="ddpm", eta=0.5)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(10)
    x, outputs = random_rollout_inputs(10)
    noises = torch.randn(10, *SHAPE, generator=torch.Generator().manual_seed(3))
    ours, theirs = x, x
    for k, t in enumerate(scheduler.timesteps):
        ours = sampler.step(ours, outputs[k], at_step(k), noises[k])
        theirs = scheduler.step(outputs[k], t, theirs, eta=0.5, variance_noise=noises[k]).prev_sample
        assert_matches(ours, theirs)


@pytest.mark.parametrize("num_steps", STEPS)
def test_flow_ode_matches_diffusers_step(num_steps):
    sampler = make_sampler("ode", FLOW_CONFIG, num_steps, family="flow")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLOW_CONFIG)
    scheduler.set_timesteps(num_steps)
    torch.testing.assert_close(sampler.model_timesteps, scheduler.timesteps)
    torch.testing.assert_close(sampler.obs_timesteps, scheduler.sigmas)
    x, outputs = random_rollout_inputs(num_steps)
    ours, theirs = x.clone(), x.clone()
    for k, t in enumerate(scheduler.timesteps):
        ours = sampler.step(ours, outputs[k], at_step(k), torch.randn(SHAPE))  # noise ignored: std 0
        theirs = scheduler.step(outputs[k], t, theirs).prev_sample
        assert_matches(ours, theirs)
    assert sampler.deterministic and sampler.stds.eq(0).all()


def test_flow_sde_without_noise_is_the_ode_exactly():
    x, outputs = random_rollout_inputs(10)
    sde = make_sampler("flow_sde", FLOW_CONFIG, 10, family="flow", noise_level=0.0)
    ode = make_sampler("ode", FLOW_CONFIG, 10, family="flow")
    assert sde.deterministic
    a, b = x.clone(), x.clone()
    for k in range(10):
        a = sde.step(a, outputs[k], at_step(k), torch.randn(SHAPE))
        b = ode.step(b, outputs[k], at_step(k), torch.zeros(SHAPE))
        assert torch.equal(a, b)


def test_flow_sde_coefficients_follow_flow_grpo():
    """std_k = a sqrt(t/(1−t)) sqrt(|Δ|), with 1−σ_1 in place of 1−t at t = 1; x̂0 = x_t − t v."""
    a, num_steps = 0.7, 4
    sampler = make_sampler("flow_sde", FLOW_CONFIG, num_steps, family="flow", noise_level=a)
    sig = sampler.obs_timesteps.double()
    one_minus_t = torch.cat([1 - sig[1:2], 1 - sig[1:-1]])  # sig[0] == 1
    expected = a * (sig[:-1] / one_minus_t).sqrt() * (sig[:-1] - sig[1:]).sqrt()
    torch.testing.assert_close(sampler.stds.double(), expected, rtol=1e-6, atol=0)
    x, outputs = random_rollout_inputs(num_steps)
    k = 2
    torch.testing.assert_close(sampler.pred_original_sample(x, outputs[k], at_step(k)), x - sig[k].float() * outputs[k])
    # the mean, written out the way Flow-GRPO's sde_step_with_logprob does
    t, dt, s = sig[k].item(), (sig[k + 1] - sig[k]).item(), a * math.sqrt(sig[k].item() / (1 - sig[k].item()))
    grpo_mean = x * (1 + s**2 / (2 * t) * dt) + outputs[k] * (1 + s**2 * (1 - t) / (2 * t)) * dt
    mean, std = sampler.step_distribution(x, outputs[k], at_step(k))
    torch.testing.assert_close(mean, grpo_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, sampler.stds[k].expand(SHAPE[0]))


def test_flow_sde_preserves_gaussian_marginals():
    """For x0 ~ N(m, s²) the exact velocity is known, so the SDE must end at N(m, s²): pins the drift sign.

    x_t = (1−t) x0 + t ε has variance V = (1−t)² s² + t², and v(x, t) = E[ε − x0 | x_t = x]
    = (t − (1−t) s²)/V · (x − (1−t) m) − m. 20k samples, K = 50: Monte-Carlo error ~0.01, the Euler
    error is of order 1/K (measured: mean 1.495, std 0.498); flipping the score term's sign ends at std 2.9.
    """
    m, s, num_steps, n = 1.5, 0.5, 50, 20_000
    sampler = make_sampler("flow_sde", FLOW_CONFIG, num_steps, family="flow", noise_level=0.7)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=gen)
    for k in range(num_steps):
        t = sampler.obs_timesteps[k]
        v = (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * (x - (1 - t) * m) - m
        x = sampler.step(x, v, torch.full((n,), k), torch.randn(n, 1, generator=gen))
    assert abs(x.mean().item() - m) < 0.03
    assert abs(x.std().item() - s) < 0.03


# --------------------------------------------------------------------------- per-sample steps


@pytest.mark.parametrize("name,family,config", [
    ("ddpm", "ddpm", DISCRETE_CONFIGS["eps-clip-trailing"]),
    ("ddim", "ddpm", DISCRETE_CONFIGS["v-noclip-leading"]),
    ("ode", "ddpm", DISCRETE_CONFIGS["sample-noclip-trailing"]),
    ("flow_sde", "flow", FLOW_CONFIG),
    ("ode", "flow", FLOW_CONFIG),
])
def test_mixed_step_batch_equals_stepping_each_sample_alone(name, family, config):
    num_steps = 4
    sampler = make_sampler(name, config, num_steps, family=family)
    gen = torch.Generator().manual_seed(1)
    x, out, noise = (torch.randn(5, 2, 4, 4, generator=gen) for _ in range(3))
    step_index = torch.tensor([2, 0, 3, 1, 3])
    batch_mean, batch_std = sampler.step_distribution(x, out, step_index)
    batch_next = sampler.step(x, out, step_index, noise)
    batch_x0 = sampler.pred_original_sample(x, out, step_index)
    for i, k in enumerate(step_index.tolist()):
        one = slice(i, i + 1)
        mean, std = sampler.step_distribution(x[one], out[one], torch.tensor([k]))
        torch.testing.assert_close(batch_mean[one], mean, rtol=0, atol=0)
        torch.testing.assert_close(batch_std[one], std, rtol=0, atol=0)
        torch.testing.assert_close(batch_next[one], sampler.step(x[one], out[one], torch.tensor([k]), noise[one]))
        torch.testing.assert_close(batch_x0[one], sampler.pred_original_sample(x[one], out[one], torch.tensor([k])))
        assert std.item() == sampler.stds[k].item()


def test_tables_have_the_documented_shapes_and_ranges():
    for name, family, config in [("ddpm", "ddpm", ddpm_config()), ("flow_sde", "flow", FLOW_CONFIG)]:
        sampler = make_sampler(name, config, 4, family=family).to("cpu")
        assert sampler.num_steps == 4 and sampler.name == name and sampler.family == family
        assert sampler.model_timesteps.shape == (4,) and sampler.model_timesteps.dtype == torch.float32
        assert sampler.obs_timesteps.shape == (5,) and sampler.obs_timesteps.dtype == torch.float32
        assert sampler.stds.shape == (4,) and sampler.stds.dtype == torch.float32
        assert sampler.obs_timesteps[-1] == 0 and (sampler.obs_timesteps[:-1] > sampler.obs_timesteps[1:]).all()
        assert sampler.obs_timesteps.max() <= 1
    ddpm = make_sampler("ddpm", ddpm_config(), 4, family="ddpm")
    torch.testing.assert_close(ddpm.obs_timesteps, torch.tensor([0.999, 0.749, 0.499, 0.249, 0.0]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tables_and_steps_live_on_the_device():
    cpu = make_sampler("flow_sde", FLOW_CONFIG, 4, family="flow")
    gpu = make_sampler("flow_sde", FLOW_CONFIG, 4, family="flow", device="cuda")
    assert gpu.stds.is_cuda and gpu.model_timesteps.is_cuda and gpu.obs_timesteps.is_cuda
    x, outputs = random_rollout_inputs(4)
    step_index = torch.tensor([0, 3, 1])
    mean, std = gpu.step_distribution(x.cuda(), outputs[0].cuda(), step_index.cuda())
    assert mean.is_cuda and std.is_cuda
    torch.testing.assert_close(mean.cpu(), cpu.step_distribution(x, outputs[0], step_index)[0])
    assert cpu.to("cuda") is cpu and cpu.stds.is_cuda


# -------------------------------------------------------------------------------- log-probs


def test_log_prob_equals_torch_normal_and_per_dim_is_the_mean():
    gen = torch.Generator().manual_seed(2)
    sample, mean = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    std = torch.tensor([0.3, 1.0, 0.05])
    reference = torch.distributions.Normal(mean.double(), std.double().view(-1, 1, 1, 1)).log_prob(sample.double())
    reference = reference.sum((1, 2, 3))
    log_prob = gaussian_log_prob(sample, mean, std)
    assert log_prob.shape == (3,) and log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob.double(), reference, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gaussian_log_prob_per_dim(sample, mean, std), log_prob / 32)
    torch.testing.assert_close(gaussian_log_prob(sample.double(), mean.double(), std.double()), reference)


def test_log_prob_is_zero_and_finite_where_std_is_zero():
    sample = torch.randn(SHAPE)
    mean = torch.randn(SHAPE, requires_grad=True)
    log_prob = gaussian_log_prob(sample, mean, torch.tensor([0.5, 0.0, 1.0]))
    assert log_prob[1] == 0 and torch.isfinite(log_prob).all()
    log_prob.sum().backward()
    assert torch.isfinite(mean.grad).all() and mean.grad[1].eq(0).all()


@pytest.mark.parametrize("name,config", [
    ("ddim", ddpm_config()),  # set_alpha_to_one: last DDIM σ = 0 (diffusers' NaN log-prob case)
    ("ddpm", ddpm_config()),  # trailing: last step lands on x0, posterior variance 0
])
def test_last_discrete_step_is_a_point_mass_with_log_prob_zero(name, config):
    sampler = make_sampler(name, config, 4, family="ddpm", eta=1.0)
    assert sampler.stds[-1] == 0 and (sampler.stds[:-1] > 0).all() and not sampler.deterministic
    x, outputs = random_rollout_inputs(4)
    mean, std = sampler.step_distribution(x, outputs[3], at_step(3))
    next_x = sampler.step(x, outputs[3], at_step(3), torch.randn(SHAPE))
    assert torch.equal(next_x, mean)
    assert gaussian_log_prob(next_x, mean, std).eq(0).all()
    mean, std = sampler.step_distribution(x, outputs[0], at_step(0))
    next_x = sampler.step(x, outputs[0], at_step(0), torch.randn(SHAPE))
    assert torch.isfinite(gaussian_log_prob(next_x, mean, std)).all()


def test_ode_log_probs_are_zero():
    for family, config in [("ddpm", ddpm_config()), ("flow", FLOW_CONFIG)]:
        sampler = make_sampler("ode", config, 4, family=family)
        assert sampler.deterministic
        x, outputs = random_rollout_inputs(4)
        mean, std = sampler.step_distribution(x, outputs[1], at_step(1))
        assert gaussian_log_prob(mean + 0.1, mean, std).eq(0).all()


# ------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("args,kwargs,message", [
    (("euler", ddpm_config(), 4), {"family": "ddpm"}, "'euler'"),
    (("ddpm", FLOW_CONFIG, 4), {"family": "flow"}, "'ddpm'.*'flow'"),
    (("ddim", FLOW_CONFIG, 4), {"family": "flow"}, "'ddim'.*'flow'"),
    (("flow_sde", ddpm_config(), 4), {"family": "ddpm"}, "'flow_sde'.*'ddpm'"),
    (("ode", ddpm_config(), 4), {"family": "edm"}, "'edm'"),
    (("ddim", ddpm_config(), 0), {"family": "ddpm"}, "num_steps.*0"),
    (("ddim", ddpm_config(), 4), {"family": "ddpm", "eta": -0.5}, "eta.*-0.5"),
    (("flow_sde", FLOW_CONFIG, 4), {"family": "flow", "noise_level": -1.0}, "noise_level.*-1.0"),
    (("ddim", ddpm_config(), 4), {"family": "ddpm", "eta": 5.0}, "eta=5.0"),
    (("ddpm", ddpm_config(thresholding=True), 4), {"family": "ddpm"}, "thresholding"),
    (("ddpm", ddpm_config(variance_type="learned_range"), 4), {"family": "ddpm"}, "'learned_range'"),
    (("ddim", {**ddpm_config(), "prediction_type": "flow"}, 4), {"family": "ddpm"}, "'flow'"),
    (("ode", {**FLOW_CONFIG, "_class_name": "FlowMatchEulerDiscreteScheduler"}, 4), {"family": "ddpm"},
     "FlowMatchEulerDiscreteScheduler"),
])
def test_bad_configuration_raises_naming_the_value(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(*args, **kwargs)


def test_bad_step_inputs_raise():
    sampler = make_sampler("ddim", ddpm_config(), 4, family="ddpm")
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="step_index"):
        sampler.step_distribution(x, x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="model_output shape"):
        sampler.step_distribution(x, torch.randn(3, 4, 4, 4), at_step(0))


def test_every_sampler_name_is_buildable():
    for name in SAMPLERS:
        family = "flow" if name == "flow_sde" else "ddpm"
        assert make_sampler(name, FLOW_CONFIG if family == "flow" else ddpm_config(), 2, family=family).name == name


def test_custom_flow_sigma_grid_matches_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).config
    grid = [1.0, 0.7, 0.4, 0.1]
    s = make_sampler("ode", cfg, 4, family="flow", sigmas=grid)
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(4, sigmas=grid)
    torch.testing.assert_close(s.obs_timesteps, ref.sigmas.float())
    torch.testing.assert_close(s.model_timesteps, ref.timesteps.float())
    default = make_sampler("ode", cfg, 4, family="flow")
    assert not torch.allclose(default.obs_timesteps, s.obs_timesteps)
    with pytest.raises(ValueError, match="sigmas must hold num_steps=4 values, got 3"):
        make_sampler("ode", cfg, 4, family="flow", sigmas=grid[:3])
