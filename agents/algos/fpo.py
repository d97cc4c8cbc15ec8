"""FPO (McAllister et al. 2025, "Flow Policy Optimization", arXiv 2507.21053).

PPO without likelihoods: the log-likelihood ratio of an action is replaced by the difference of its
conditional-flow-matching losses (an ELBO surrogate) under the old and the new policy. Per sample i
(action `a` = the final latent x0 of its trajectory, condition c, group advantage A_i):

1. draw N_mc pairs (t_j, ε_j) once, in `prepare`, from the algorithm's own generator;
2. `ℓ(a) = mean_j ‖v̂(x_{t_j}, t_j, c) − (ε_j − a)‖²`, `x_{t_j} = (1 − t_j) a + t_j ε_j`,
   ‖·‖² averaged over latent dims; ℓ_old once in `prepare`, ℓ_θ in `loss` on the *same* draws;
3. `ρ = exp(ℓ_old − ℓ_θ)` (= 1 at θ_old); `L = E max(−A ρ, −A clip(ρ, 1 ± ε))`, ε ≈ 0.05.

Conventions. The paper writes `a_τ = τ a + (1 − τ) ε` (τ = 1 is data) with target `a − ε`. Our flow
models use `x_t = (1 − t) x0 + t ε` (t = 1 is noise) and predict `v = ε − x0`; with t = 1 − τ the
interpolants coincide and `‖v̂_ours − (ε − a)‖² = ‖(−v̂_ours) − (a − ε)‖²`: the same loss. τ ~ U(0, 1) is
t ~ U(0, 1), the distribution the flow model was trained on (network timestep `T·t`).

Families: rectified flow only (`families = ("flow",)`). The FPO-for-diffusion variant for ε-models —
the model's own ε-MSE at the DDPM noising `x_τ = √ᾱ_τ a + √(1−ᾱ_τ) ε` as the "CFM loss", a weighted
ELBO like any denoising loss (Kingma & Gao 2023) — is what `ForwardProcess` would give, and it was
tried: on digits-eps it *lowered* the reward (figures and commit: docs/design.md §11),
while the same code raised it on digits-flow. Uniform-τ ε-MSE puts little
weight on the high-noise levels where a sample's structure is decided; re-weighting it to the flow
velocity error, ((√ᾱ + √(1−ᾱ))/√ᾱ)², diverges as ᾱ → 0 (NaN over the full range, and still a lower
reward when truncated at flow time 0.95). So ε-models are refused rather than trained with a
surrogate that, here, does not track their likelihood.

The squared error is averaged over latent dims (a summed error makes ρ ~D times more sensitive per
parameter step; with Adam the two differ only in which ε and learning rate pair up). FPO ignores how
the action was sampled, so any rollout sampler works; only x0 and the condition are used.

`ForwardProcess` (the family's noising, regression target and x̂0) is shared with DiffusionNFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from agents.advantages import group_advantages
from agents.algos.base import AlgoConfig, Algorithm, clipped_surrogate
from agents.policy import DiffusionPolicy
from diffenv.models.lora import adapter_disabled
from diffenv.validation import SEED, bounds


class ForwardProcess:
    """The forward (noising) process a model was trained with, indexed by u ∈ [0, 1) (0 = data).

    | family | noising at u                           | network timestep | target (output space)               |
    |--------|----------------------------------------|------------------|-------------------------------------|
    | flow   | x_t = (1 − t) x0 + t ε, t = u          | T · t            | ε − x0                              |
    | ddpm   | x_τ = √ᾱ_τ x0 + √(1−ᾱ_τ) ε, τ = ⌊u T⌋  | τ                | ε; √ᾱ ε − √(1−ᾱ) x0 (v-pred); x0    |

    These are the distributions the models were trained on (`diffenv.models.train_digits`).

    `x0_sign` is the sign of ∂x̂0/∂(model output): −1 for flow, ε and v prediction, +1 for x0 prediction.
    """

    def __init__(self, policy: DiffusionPolicy):
        self.policy = policy
        backend = policy.backend
        self.family, self.prediction_type = backend.family, backend.prediction_type
        self.num_train_timesteps = int(backend.num_train_timesteps)
        self.x0_sign = 1.0 if self.prediction_type == "sample" else -1.0
        if self.family == "ddpm":
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler.from_config(backend.scheduler_config)
            self.alphas_cumprod = scheduler.alphas_cumprod.double().to(policy.device)  # [T]

    def draw(self, n: int, shape, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """u [n] ~ U(0, 1) and ε [n, *shape] ~ N(0, I) from `generator`."""
        dev = self.policy.device
        u = torch.rand(n, generator=generator, device=dev)
        return u, torch.randn((n, *shape), generator=generator, device=dev)

    def _coefs(self, u: torch.Tensor, like: torch.Tensor):
        """(signal, noise) coefficients [n, 1, ...] and the network timesteps [n]."""
        view = (-1, *([1] * (like.dim() - 1)))
        if self.family == "flow":
            return (1 - u).view(view), u.view(view), u * self.num_train_timesteps
        tau = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        abar = self.alphas_cumprod[tau].to(like.dtype)
        return abar.sqrt().view(view), (1 - abar).sqrt().view(view), tau.to(like.dtype)

    def noise(self, x0: torch.Tensor, u: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_u [n, C, H, W], network timesteps [n])."""
        a, s, timesteps = self._coefs(u, x0)
        return a * x0 + s * eps, timesteps

    def target(self, x0: torch.Tensor, u: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The regression target in the model's output space (what its training loss regressed on)."""
        if self.prediction_type == "flow":
            return eps - x0
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            a, s, _ = self._coefs(u, x0)
            return a * eps - s * x0
        return x0

    def pred_x0(self, output: torch.Tensor, x_t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """x̂0 implied by the model output at (x_u, u), unclipped."""
        a, s, _ = self._coefs(u, x_t)
        if self.prediction_type == "flow":
            return x_t - s * output
        if self.prediction_type == "epsilon":
            return (x_t - s * output) / a
        if self.prediction_type == "v_prediction":
            return a * x_t - s * output
        return output

    def model_output(self, x_t: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor,
                     reference: bool = False) -> torch.Tensor:
        """The policy's network output (with its CFG weight) at arbitrary timesteps; base model if `reference`."""
        p = self.policy
        if reference:
            with adapter_disabled(p.denoiser):
                return p.backend.predict(x_t, timesteps, conditions, p.guidance_scale)
        return p.backend.predict(x_t, timesteps, conditions, p.guidance_scale)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dims: [B, ...] -> [B]."""
    return x.flatten(1).mean(1)


@dataclass
class FPOConfig(AlgoConfig):
    minibatch_size: int = 16
    """samples (each with n_mc noise draws) per optimizer step"""
    inner_epochs: int = 2
    """passes over each epoch's samples (PPO reuse; the clip keeps it proximal)"""
    clip_range: float = field(default=0.05, metadata=bounds(gt=0))
    """PPO ε on the CFM-difference ratio"""
    n_mc: int = field(default=4, metadata=bounds(ge=1))
    """Monte-Carlo (t, ε) draws per sample, shared by ℓ_old and ℓ_θ"""
    adv_eps: float = field(default=1e-4, metadata=bounds(gt=0))
    """added to the group std"""
    seed: int = field(default=0, metadata=SEED)
    """seed of the algorithm's generator for the (t, ε) draws (plus the rank)"""


def cfm_losses(process: ForwardProcess, actions, times, noises, conditions) -> torch.Tensor:
    """ℓ per draw, [b, n]: mean-over-dims squared error of the model output against the target."""
    b, n = times.shape
    a = actions.unsqueeze(1).expand(b, n, *actions.shape[1:]).reshape(b * n, *actions.shape[1:])
    eps, u = noises.reshape(b * n, *noises.shape[2:]), times.reshape(-1)
    x_t, timesteps = process.noise(a, u, eps)
    out = process.model_output(x_t, timesteps, conditions.repeat_interleave(n))
    return per_sample_mean((out - process.target(a, u, eps)).pow(2)).view(b, n)


class FPO(Algorithm):
    name = "fpo"
    Config = FPOConfig
    families = ("flow",)

    def __init__(self, policy, cfg: FPOConfig, dist=None):
        super().__init__(policy, cfg, dist)
        if cfg.n_mc < 1:
            raise ValueError(f"n_mc must be >= 1, got {cfg.n_mc}")
        self.process = ForwardProcess(policy)
        self.generator = torch.Generator(device=policy.device).manual_seed(cfg.seed + self.dist.rank)

    @torch.no_grad()
    def prepare(self, rollout: TensorDict) -> TensorDict:
        actions = rollout["latents"][:, -1]  # a = x0, [B, C, H, W]
        b = actions.shape[0]
        u, eps = self.process.draw(b * self.cfg.n_mc, actions.shape[1:], self.generator)
        items = TensorDict({
            "actions": actions,
            "conditions": rollout["conditions"],
            "group_ids": rollout["group_ids"],
            "rewards": rollout["rewards"],
            "advantages": group_advantages(rollout["rewards"], rollout["group_ids"], self.cfg.adv_eps),
            "times": u.view(b, self.cfg.n_mc),
            "noises": eps.view(b, self.cfg.n_mc, *actions.shape[1:]),
        }, batch_size=[b], device=actions.device)
        chunks = [cfm_losses(self.process, *(mb[k] for k in ("actions", "times", "noises", "conditions")))
                  for mb in items.split(self.cfg.minibatch_size)]
        items["cfm_old"] = torch.cat(chunks)  # [B, n_mc]
        return items

    def loss(self, items: TensorDict) -> dict:
        cfm = cfm_losses(self.process, items["actions"], items["times"], items["noises"], items["conditions"])
        log_ratio = items["cfm_old"].mean(1) - cfm.mean(1)  # log ρ = ℓ_old − ℓ_θ
        out = clipped_surrogate(log_ratio, items["advantages"], self.cfg.clip_range)
        out["cfm_loss"] = cfm.mean().detach()
        return out

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
