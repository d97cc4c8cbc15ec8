"""Per-step Gaussian transitions with exact log-probs (docs/design.md §3).

Every sampler step is a Gaussian policy `x_{k+1} ~ N(mean_k(x_k, model_output), std_k² I)`, where
`k = 0..K-1` counts steps from the noisiest one. Each sample of a batch may sit at a different step
`k` (`step_index` [B]): the per-step coefficients live in [K] tables that are gathered per sample, so
one call serves a whole vector env or an RL minibatch mixing steps.

The maths is written here from the papers; the diffusers schedulers only supply their *tables*
(`timesteps`, `alphas_cumprod`, `final_alpha_cumprod`, `sigmas`) because their `step` takes one
scalar timestep. Each transition is tested against the `step` it mirrors (tests/test_samplers.py).

| name       | family | transition                                                           |
|------------|--------|----------------------------------------------------------------------|
| `ddpm`     | ddpm   | DDPM posterior q(x_{t-1} given x_t, x̂0) (Ho et al. 2020, eq. 6-7)   |
| `ddim`     | ddpm   | DDIM with η (Song et al. 2021, eq. 12 and 16)                         |
| `ode`      | ddpm   | DDIM with η = 0 (deterministic)                                        |
| `flow_sde` | flow   | Flow-GRPO SDE, Euler-Maruyama (Liu et al. 2025, eq. 8)                 |
| `ode`      | flow   | rectified-flow Euler ODE (= `FlowMatchEulerDiscreteScheduler.step`)    |
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from diffenv.forward import predicted_noise, predicted_x0

SAMPLERS = ("ddpm", "ddim", "ode", "flow_sde")
FAMILY_SAMPLERS = {"ddpm": ("ddpm", "ddim", "ode"), "flow": ("flow_sde", "ode")}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


def _accumulate_dtype(device: torch.device) -> torch.dtype:
    # Tables and log-prob sums are kept in float64 (MPS has none): log-probs sum thousands of terms and
    # PPO ratios exp(Δ log π) amplify their rounding.
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _broadcast(values: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with `ndim` dims, to scale per-sample latents."""
    return values.reshape(-1, *([1] * (ndim - 1)))


class Sampler:
    """A K-step Gaussian sampler over per-step [K] tables; see the subclasses for the equations.

    Attributes:
        name, family: as given to `make_sampler`.
        num_steps: K.
        model_timesteps: [K] float32, the timestep fed to the network at step k (0 = noisiest).
        obs_timesteps: [K+1] float32 in [0, 1], `t_k / T_train` (flow: `sigma_k`), 0 at k = K.
        stds: [K] float32, std of the step-k transition (0 where it is deterministic).
        deterministic: all stds are 0 (log-probs are then 0: a point mass is no decision).
        prediction_type: what the network predicts ("epsilon", "v_prediction", "sample", "flow").
    """

    name: str
    family: str
    prediction_type: str

    def __init__(self, name: str, family: str, model_timesteps: Tensor, obs_timesteps: Tensor,
                 stds: Tensor, coefs: dict[str, Tensor], device="cpu"):
        self.name, self.family = name, family
        self.num_steps = int(model_timesteps.shape[0])
        self.model_timesteps = model_timesteps.float()
        self.obs_timesteps = obs_timesteps.float()
        self._stds = stds.double()
        self._coefs = coefs  # name -> [K] table in the accumulate dtype
        self.deterministic = bool((stds == 0).all())
        self.to(device)

    @property
    def stds(self) -> Tensor:
        return self._stds.float()

    def to(self, device) -> "Sampler":
        """Move the tables to `device` (in place, like `nn.Module.to`); returns self."""
        self.device = torch.device(device)
        acc = _accumulate_dtype(self.device)
        self.model_timesteps = self.model_timesteps.to(self.device)
        self.obs_timesteps = self.obs_timesteps.to(self.device)
        self._stds = self._stds.to(self.device, acc)
        self._coefs = {k: v.to(self.device, acc) for k, v in self._coefs.items()}
        return self

    def step_index_of(self, timestep: Tensor) -> Tensor:
        """The step index k [B] whose observed timestep `obs_timesteps[k]` is `timestep` ([B] or [B, 1]).

        Policies that see only the env's observation use it. The terminal observation (k = K) maps to
        K − 1: its action is never used. Raises if a timestep is off this sampler's grid (a policy and an
        env built with different samplers).
        """
        table = self.obs_timesteps.to(timestep.device)  # [K+1], decreasing
        err, k = (timestep.reshape(-1, 1).float() - table).abs().min(-1)
        if (err > 1e-4).any():
            bad = timestep.reshape(-1)[err > 1e-4][:4].tolist()
            raise ValueError(f"timesteps {bad} are not on the policy's sampler grid {table.tolist()}; "
                             "build the env from policy.env_kwargs()")
        return k.clamp(max=self.num_steps - 1)

    def _prepare(self, latents: Tensor, model_output: Tensor, step_index) -> tuple[Tensor, Tensor, Tensor]:
        """Common input handling: float32 (or float64) maths, step_index as [B] int64 on the latents' device."""
        if model_output.shape != latents.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != latents shape {tuple(latents.shape)}")
        dtype = torch.promote_types(latents.dtype, torch.float32)
        batch = latents.shape[0]
        step_index = torch.as_tensor(step_index, device=latents.device, dtype=torch.long)
        if step_index.ndim == 0:
            step_index = step_index.expand(batch)
        if step_index.shape != (batch,):
            raise ValueError(f"step_index must have shape ({batch},), got {tuple(step_index.shape)}")
        return latents.to(dtype), model_output.to(dtype), step_index

    def _gather(self, table: Tensor, step_index: Tensor, like: Tensor) -> Tensor:
        """Per-sample coefficient table[step_index] shaped [B, 1, ..., 1] in `like`'s dtype."""
        return _broadcast(table[step_index.to(table.device)].to(like.device, like.dtype), like.ndim)

    def _std(self, step_index: Tensor, like: Tensor) -> Tensor:
        return self._stds[step_index.to(self._stds.device)].to(like.device, like.dtype)  # [B]

    def pred_original_sample(self, latents: Tensor, model_output: Tensor, step_index) -> Tensor:
        """x̂0 [B, C, H, W] implied by the model output at each sample's step."""
        raise NotImplementedError

    def step_distribution(self, latents: Tensor, model_output: Tensor, step_index) -> tuple[Tensor, Tensor]:
        """(mean [B, C, H, W], std [B]) of x_{k+1} ~ N(mean, std² I) given x_k and the model output."""
        raise NotImplementedError

    def step(self, latents: Tensor, model_output: Tensor, step_index, noise: Tensor) -> Tensor:
        """x_{k+1} = mean + std · noise; `noise` (ε ~ N(0, I) for the base sampler) is ignored where std = 0."""
        mean, std = self.step_distribution(latents, model_output, step_index)
        std = _broadcast(std, mean.ndim)
        return torch.where(std > 0, mean + std * noise.to(mean.dtype), mean)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, num_steps={self.num_steps})"


class _DiscreteTimeSampler(Sampler):
    """DDPM-family base: x̂0 and ε̂ from the network's `prediction_type` (`diffenv.forward`, α = sqrt(ᾱ_t),
    σ = sqrt(1−ᾱ_t): Ho et al. eq. 15, Salimans & Ho 2022).

    x̂0 is then clamped to ±clip_sample_range if `clip_sample`; ε̂ stays the unclipped one (diffusers'
    `use_clipped_model_output=False`).
    """

    def __init__(self, *args, prediction_type: str, clip_range: float | None, **kwargs):
        self.prediction_type = prediction_type
        self.clip_range = clip_range
        super().__init__(*args, **kwargs)

    def _x0_and_eps(self, latents: Tensor, model_output: Tensor, step_index: Tensor) -> tuple[Tensor, Tensor]:
        sqrt_a = self._gather(self._coefs["sqrt_alpha_prod"], step_index, latents)
        sqrt_1ma = self._gather(self._coefs["sqrt_one_minus_alpha_prod"], step_index, latents)
        x0 = predicted_x0(self.prediction_type, latents, model_output, sqrt_a, sqrt_1ma)
        eps = predicted_noise(self.prediction_type, latents, model_output, sqrt_a, sqrt_1ma)
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0, eps

    def pred_original_sample(self, latents: Tensor, model_output: Tensor, step_index) -> Tensor:
        return self._x0_and_eps(*self._prepare(latents, model_output, step_index))[0]


class DDPMSampler(_DiscreteTimeSampler):
    """DDPM ancestral step: the posterior q(x_{t'} | x_t, x̂0) of Ho et al. (2020), eq. 6-7.

    With t' the next inference timestep (ᾱ_{t'} = 1 past the end), α_t = ᾱ_t/ᾱ_{t'}, β_t = 1 − α_t:

        mean = sqrt(ᾱ_{t'}) β_t / (1−ᾱ_t) · x̂0 + sqrt(α_t) (1−ᾱ_{t'}) / (1−ᾱ_t) · x_t
        var  = β̃_t = (1−ᾱ_{t'}) / (1−ᾱ_t) · β_t          ("fixed_small", "fixed_small_log")
        var  = β_t                                          ("fixed_large")

    As in `DDPMScheduler.step`, no noise is added at t = 0 and var is clamped at 1e-20. One deliberate
    difference: where β̃_t is exactly 0 (the last step into x0) std is 0, not diffusers' 1e-10, so the
    step is a point mass with log-prob 0 instead of a 1e-10-wide Gaussian whose log-probs explode.
    """

    def step_distribution(self, latents: Tensor, model_output: Tensor, step_index) -> tuple[Tensor, Tensor]:
        latents, model_output, step_index = self._prepare(latents, model_output, step_index)
        x0, _ = self._x0_and_eps(latents, model_output, step_index)
        mean = (self._gather(self._coefs["coef_x0"], step_index, latents) * x0
                + self._gather(self._coefs["coef_xt"], step_index, latents) * latents)
        return mean, self._std(step_index, latents)


class DDIMSampler(_DiscreteTimeSampler):
    """DDIM step with η (Song et al. 2021, eq. 12), t' = t − T_train // K as in `DDIMScheduler.step`:

        x_{t'} = sqrt(ᾱ_{t'}) x̂0 + sqrt(1 − ᾱ_{t'} − σ_t²) ε̂ + σ_t ε
        σ_t    = η sqrt((1−ᾱ_{t'}) / (1−ᾱ_t)) sqrt(1 − ᾱ_t/ᾱ_{t'})                       (eq. 16)

    ᾱ_{t'} = `final_alpha_cumprod` past the end, so with `set_alpha_to_one` the last σ is 0 (std 0,
    log-prob 0). η = 0 is the deterministic DDIM ODE sampler ("ode"), η = 1 the DDPM-like posterior.
    """

    def step_distribution(self, latents: Tensor, model_output: Tensor, step_index) -> tuple[Tensor, Tensor]:
        latents, model_output, step_index = self._prepare(latents, model_output, step_index)
        x0, eps = self._x0_and_eps(latents, model_output, step_index)
        mean = (self._gather(self._coefs["sqrt_alpha_prod_prev"], step_index, latents) * x0
                + self._gather(self._coefs["coef_eps"], step_index, latents) * eps)
        return mean, self._std(step_index, latents)


class FlowSampler(Sampler):
    """Rectified-flow step, x_t = (1−t) x0 + t ε, v = ε − x0, t = σ_k from 1 to 0, Δ = σ_{k+1} − σ_k < 0.

    Flow-GRPO SDE (Liu et al. 2025, eq. 8; Euler-Maruyama of the reverse SDE whose marginals match the
    ODE, using score = −(x_t + (1−t) v)/t):

        x_{t+Δ} = x_t + [v + s_t²/(2t) · (x_t + (1−t) v)] Δ + s_t sqrt(|Δ|) ε,   s_t = a sqrt(t / (1−t))

    with a = `noise_level`. s_t diverges at t = 1, so there (only) 1−t is replaced by 1−σ_1, the next
    sigma, exactly as Flow-GRPO's `sde_step_with_logprob` does; the drift's own (1−t) factor is kept.
    a = 0 gives the Euler ODE `x_{t+Δ} = x_t + Δ v` of `FlowMatchEulerDiscreteScheduler.step` ("ode").
    """

    prediction_type = "flow"

    def pred_original_sample(self, latents: Tensor, model_output: Tensor, step_index) -> Tensor:
        """x̂0 = x_t − t v."""
        latents, model_output, step_index = self._prepare(latents, model_output, step_index)
        t = self._gather(self._coefs["sigma"], step_index, latents)
        return predicted_x0("flow", latents, model_output, 1 - t, t)

    def step_distribution(self, latents: Tensor, model_output: Tensor, step_index) -> tuple[Tensor, Tensor]:
        latents, v, step_index = self._prepare(latents, model_output, step_index)
        t = self._gather(self._coefs["sigma"], step_index, latents)
        drift = v + self._gather(self._coefs["score_coef"], step_index, latents) * (latents + (1 - t) * v)
        mean = latents + self._gather(self._coefs["dt"], step_index, latents) * drift
        return mean, self._std(step_index, latents)


# --------------------------------------------------------------------------------------- tables


def _discrete_tables(scheduler, prev_timesteps: Tensor, final_alpha_prod: float) -> dict[str, Tensor]:
    """ᾱ_t, ᾱ_{t'} (float64) for the scheduler's inference timesteps and the given previous ones."""
    alphas = scheduler.alphas_cumprod.double()
    t = scheduler.timesteps.long()
    alpha_prod = alphas[t]
    alpha_prod_prev = torch.where(prev_timesteps >= 0, alphas[prev_timesteps.clamp(min=0)],
                                  torch.tensor(float(final_alpha_prod), dtype=torch.float64))
    return {"sqrt_alpha_prod": alpha_prod.sqrt(), "sqrt_one_minus_alpha_prod": (1 - alpha_prod).sqrt(),
            "alpha_prod": alpha_prod, "alpha_prod_prev": alpha_prod_prev}


def _check_ddpm_config(scheduler) -> tuple[str, float | None]:
    config = scheduler.config
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {config.prediction_type!r} is not supported; "
                         f"expected one of {PREDICTION_TYPES}")
    if getattr(config, "thresholding", False):
        raise ValueError("thresholding=True is not supported (dynamic thresholding has no Gaussian log-prob "
                         "form here); use clip_sample instead")
    return config.prediction_type, (float(config.clip_sample_range) if config.clip_sample else None)


def _make_ddpm(scheduler_config: dict, num_steps: int, device) -> DDPMSampler:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config)
    prediction_type, clip_range = _check_ddpm_config(scheduler)
    variance_type = scheduler.config.variance_type
    if variance_type not in DDPM_VARIANCE_TYPES:
        raise ValueError(f"DDPM variance_type {variance_type!r} is not supported; "
                         f"expected one of {DDPM_VARIANCE_TYPES}")
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.long()
    # DDPMScheduler.previous_timestep: the next entry of `timesteps`, −1 after the last one.
    prev = torch.cat([timesteps[1:], timesteps.new_tensor([-1])])
    tab = _discrete_tables(scheduler, prev, 1.0)
    alpha_t = tab["alpha_prod"] / tab["alpha_prod_prev"]
    beta_t = 1 - alpha_t
    one_minus = 1 - tab["alpha_prod"]
    posterior_var = (1 - tab["alpha_prod_prev"]) / one_minus * beta_t
    var = beta_t if variance_type == "fixed_large" else posterior_var
    stds = torch.where((timesteps > 0) & (var > 0), var.clamp(min=1e-20).sqrt(), torch.zeros_like(var))
    coefs = {"sqrt_alpha_prod": tab["sqrt_alpha_prod"], "sqrt_one_minus_alpha_prod": tab["sqrt_one_minus_alpha_prod"],
             "coef_x0": tab["alpha_prod_prev"].sqrt() * beta_t / one_minus,
             "coef_xt": alpha_t.sqrt() * (1 - tab["alpha_prod_prev"]) / one_minus}
    return DDPMSampler("ddpm", "ddpm", *_discrete_time_grid(scheduler), stds, coefs, device=device,
                       prediction_type=prediction_type, clip_range=clip_range)


def _make_ddim(name: str, scheduler_config: dict, num_steps: int, eta: float, device) -> DDIMSampler:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    prediction_type, clip_range = _check_ddpm_config(scheduler)
    scheduler.set_timesteps(num_steps)
    prev = scheduler.timesteps.long() - scheduler.config.num_train_timesteps // num_steps
    tab = _discrete_tables(scheduler, prev, float(scheduler.final_alpha_cumprod))
    a, a_prev = tab["alpha_prod"], tab["alpha_prod_prev"]
    var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    stds = eta * var.sqrt()
    direction = 1 - a_prev - stds**2
    if (direction < -1e-12).any():
        raise ValueError(f"eta={eta} is too large for this schedule: 1 − ᾱ_prev − σ² < 0 at some step; "
                         "expected eta ≤ 1")
    coefs = {"sqrt_alpha_prod": tab["sqrt_alpha_prod"], "sqrt_one_minus_alpha_prod": tab["sqrt_one_minus_alpha_prod"],
             "sqrt_alpha_prod_prev": a_prev.sqrt(), "coef_eps": direction.clamp(min=0).sqrt()}
    return DDIMSampler(name, "ddpm", *_discrete_time_grid(scheduler), stds, coefs, device=device,
                       prediction_type=prediction_type, clip_range=clip_range)


def _discrete_time_grid(scheduler) -> tuple[Tensor, Tensor]:
    """(model_timesteps [K], obs_timesteps [K+1] = t_k / T_train with a final 0)."""
    model_timesteps = scheduler.timesteps.float()
    obs = torch.cat([model_timesteps / scheduler.config.num_train_timesteps, torch.zeros(1)])
    return model_timesteps, obs


def _make_flow(name: str, scheduler_config: dict, num_steps: int, noise_level: float, device,
               mu: float | None, sigmas=None) -> FlowSampler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    for flag in ("invert_sigmas", "stochastic_sampling"):
        if scheduler.config.get(flag, False):
            raise ValueError(f"flow scheduler config {flag}=True is not supported; expected {flag}=False")
    if scheduler.config.use_dynamic_shifting and mu is None:
        raise ValueError("the flow scheduler config has use_dynamic_shifting=True: pass mu=<float> (the "
                         "resolution-dependent shift the pipeline computes)")
    if sigmas is not None and len(sigmas) != num_steps:
        raise ValueError(f"sigmas must hold num_steps={num_steps} values, got {len(sigmas)}")
    kwargs = {"mu": mu} if scheduler.config.use_dynamic_shifting else {}
    if sigmas is not None:  # a pipeline's own grid (e.g. FluxPipeline's linspace(1, 1/K, K)), shifted by the scheduler
        kwargs["sigmas"] = [float(s) for s in sigmas]
    scheduler.set_timesteps(num_steps, **kwargs)
    sigmas32 = scheduler.sigmas.float().cpu()  # [K+1], last 0
    sigmas = sigmas32.double()
    t, t_next = sigmas[:-1], sigmas[1:]
    if not (t > 0).all() or not (t_next < t).all():
        raise ValueError(f"flow sigmas must decrease strictly from >0 to 0, got {sigmas32.tolist()}")
    dt = t_next - t  # exact in float64; rounds to diffusers' float32 `sigma_next - sigma`
    one_minus_t = torch.where(t == 1, 1 - sigmas[1], 1 - t)  # Flow-GRPO's t = 1 substitution
    s = noise_level * (t / one_minus_t).sqrt()
    coefs = {"sigma": t, "dt": dt, "score_coef": s**2 / (2 * t)}
    return FlowSampler(name, "flow", scheduler.timesteps.float().cpu(), sigmas32, s * (-dt).sqrt(), coefs,
                       device=device)


def make_sampler(name: str, scheduler_config: dict, num_steps: int, *, family: str, eta: float = 1.0,
                 noise_level: float = 0.7, device="cpu", mu: float | None = None, sigmas=None) -> Sampler:
    """Build a K-step sampler from a diffusers scheduler config.

    Args:
        name: one of `SAMPLERS`; family "ddpm" allows ddpm/ddim/ode (= DDIM η=0), "flow" flow_sde/ode.
        scheduler_config: a diffusers scheduler config (DDPM/DDIM-style for "ddpm", FlowMatch for "flow").
        num_steps: K ≥ 1 inference steps.
        family: "ddpm" (ε / v / x0 prediction) or "flow" (rectified-flow velocity).
        eta: DDIM η ≥ 0 (only "ddim").
        noise_level: Flow-GRPO's a ≥ 0 in s_t = a sqrt(t/(1−t)) (only "flow_sde").
        device: where the tables live.
        mu: the resolution-dependent shift for flow configs with `use_dynamic_shifting` (Flux, SD3.5).
        sigmas: a custom K-value flow sigma grid before shifting, as a pipeline passes to `set_timesteps`.
    """
    if family not in FAMILY_SAMPLERS:
        raise ValueError(f"unknown model family {family!r}; expected one of {tuple(FAMILY_SAMPLERS)}")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
    if name not in FAMILY_SAMPLERS[family]:
        raise ValueError(f"sampler {name!r} does not apply to family {family!r}; "
                         f"family {family!r} supports {FAMILY_SAMPLERS[family]}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer ≥ 1, got {num_steps!r}")
    if not eta >= 0:  # also rejects NaN
        raise ValueError(f"eta must be ≥ 0, got {eta!r}")
    if not noise_level >= 0:
        raise ValueError(f"noise_level must be ≥ 0, got {noise_level!r}")
    class_name = dict(scheduler_config).get("_class_name", "")
    if class_name and ("FlowMatch" in class_name) != (family == "flow"):
        raise ValueError(f"scheduler config of {class_name!r} does not fit family {family!r}")
    num_steps = int(num_steps)
    if family == "flow":
        return _make_flow(name, scheduler_config, num_steps, noise_level if name == "flow_sde" else 0.0, device, mu,
                          sigmas)
    if name == "ddpm":
        return _make_ddpm(scheduler_config, num_steps, device)
    return _make_ddim(name, scheduler_config, num_steps, eta if name == "ddim" else 0.0, device)


# ------------------------------------------------------------------------------------ log-probs


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Exact log N(sample; mean, std² I) summed over all non-batch dims -> [B].

        log p = −‖sample − mean‖² / (2 std²) − D log std − D/2 log 2π

    Accumulated in float64 (differentiable w.r.t. `mean`) and returned in the inputs' float dtype
    (float32 for float32 inputs; pass float64 tensors for a float64 result). Rows with std = 0 are
    deterministic steps (a point mass, no decision): their log-prob is 0, never NaN or inf.
    `std` is [B] (or a scalar / [B, 1, 1, 1]).
    """
    batch = sample.shape[0]
    out_dtype = torch.promote_types(torch.promote_types(sample.dtype, mean.dtype), torch.float32)
    acc = _accumulate_dtype(sample.device)
    std = torch.as_tensor(std, device=sample.device).to(acc).reshape(-1).expand(batch)
    dims = sample[0].numel()
    random = std > 0
    safe_std = torch.where(random, std, torch.ones_like(std))
    sq = (sample.to(acc) - mean.to(acc)).pow(2).reshape(batch, -1).sum(1)
    log_prob = -sq / (2 * safe_std**2) - dims * torch.log(safe_std) - 0.5 * dims * math.log(2 * math.pi)
    return torch.where(random, log_prob, torch.zeros_like(log_prob)).to(out_dtype)


def gaussian_log_prob_per_dim(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """`gaussian_log_prob` divided by the number of non-batch dims D (DDPO's reporting scale) -> [B]."""
    return gaussian_log_prob(sample, mean, std) / sample[0].numel()
