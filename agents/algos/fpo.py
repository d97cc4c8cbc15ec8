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
ELBO like any denoising loss (Kingma & Gao 2023) — is what `diffenv.forward.ForwardProcess` would give, and it was
tried: on digits-eps it *lowered* the reward (figures and commit: docs/design.md §11),
while the same code raised it on digits-flow. Uniform-τ ε-MSE puts little
weight on the high-noise levels where a sample's structure is decided; re-weighting it to the flow
velocity error, ((√ᾱ + √(1−ᾱ))/√ᾱ)², diverges as ᾱ → 0 (NaN over the full range, and still a lower
reward when truncated at flow time 0.95). So ε-models are refused rather than trained with a
surrogate that, here, does not track their likelihood.

The squared error is averaged over latent dims (a summed error makes ρ ~D times more sensitive per
parameter step; with Adam the two differ only in which ε and learning rate pair up). FPO ignores how
the action was sampled, so any rollout sampler works; only x0 and the condition are used.

The family's noising and regression target are `diffenv.forward.ForwardProcess` (beside the samplers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from agents.advantages import group_advantages
from agents.algos.base import AlgoConfig, Algorithm, register_algorithm
from agents.losses import clipped_surrogate, kl_terms, output_anchor, per_sample_mean
from agents.policy import DiffusionPolicy
from diffenv.forward import ForwardProcess
from diffenv.validation import SEED, bounds


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
    kl_coef: float = field(default=0.1, metadata=bounds(ge=0))
    """λ of an anchor to the base model, λ · mean ‖v_θ − v_ref‖² at the Monte-Carlo draws (DiffusionNFT's form;
    0 skips the reference forward). Without it FPO sharpens its classes: on digits-flow 3 (seed 0, 4,096 images)
    the within-class variance fell 0.0505 → 0.0335; at 0.1 it stayed at 0.049 (docs/design.md §7.4)"""
    seed: int = field(default=0, metadata=SEED)
    """seed of the algorithm's generator for the (t, ε) draws (each rank's own: `stream_seed`)"""


def cfm_losses(policy: DiffusionPolicy, process: ForwardProcess, actions, times, noises, conditions,
               reference: bool = False, guidance_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ℓ per draw [b, n]: mean-over-dims squared error of the model output against the target, the outputs
    [b·n, C, H, W]); `reference`: the frozen base's, at `guidance_scale` (None: the policy's)."""
    b, n = times.shape
    a = actions.unsqueeze(1).expand(b, n, *actions.shape[1:]).reshape(b * n, *actions.shape[1:])
    eps, u = noises.reshape(b * n, *noises.shape[2:]), times.reshape(-1)
    x_t, timesteps = process.noise(a, u, eps)
    out = policy.predict(x_t, timesteps, conditions.repeat_interleave(n), reference, guidance_scale)
    return per_sample_mean((out - process.target(a, u, eps)).pow(2)).view(b, n), out


@register_algorithm
class FPO(Algorithm):
    name = "fpo"
    visited_states = None  # forward-process draws of x0
    Config = FPOConfig
    families = ("flow",)

    def __init__(self, policy, cfg: FPOConfig, dist=None):
        super().__init__(policy, cfg, dist)
        self.process = ForwardProcess.of(policy.backend)
        self.generator = torch.Generator(device=policy.device)
        self.generator.manual_seed(self.dist.stream_seed(cfg.seed, "algorithm"))

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
        keys = ("actions", "times", "noises", "conditions")
        items["cfm_old"] = torch.cat([cfm_losses(self.policy, self.process, *(mb[k] for k in keys))[0]
                                      for mb in items.split(self.cfg.minibatch_size)])  # [B, n_mc]
        if self.cfg.kl_coef > 0:
            ref = [cfm_losses(self.policy, self.process, *(mb[k] for k in keys), reference=True,
                              guidance_scale=self.reference_scale(True))[1]
                   for mb in items.split(self.cfg.minibatch_size)]
            items["ref_outputs"] = torch.cat(ref).view(b, self.cfg.n_mc, *actions.shape[1:])
        return items

    def loss(self, items: TensorDict) -> dict:
        cfm, outputs = cfm_losses(self.policy, self.process, items["actions"], items["times"], items["noises"],
                                  items["conditions"])
        log_ratio = items["cfm_old"].mean(1) - cfm.mean(1)  # log ρ = ℓ_old − ℓ_θ
        out = clipped_surrogate(log_ratio, items["advantages"], self.cfg.clip_range)
        if self.cfg.kl_coef > 0:
            out |= kl_terms(output_anchor(outputs, items["ref_outputs"].flatten(0, 1)), self.kl_coef_now())
        out["cfm_loss"] = cfm.mean().detach()
        return out

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
