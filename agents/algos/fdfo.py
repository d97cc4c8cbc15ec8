"""FDFO (McAllister et al. 2026, arXiv 2603.12893), written from the equations of docs/design.md §7.6.

Rollouts come in pairs that start from the same x_T (`group_size=2`, `share_noise=True`) and diverge
only through the sampler's stochastic "churn" (flow-SDE `noise_level` / DDIM `eta`; the paper's churn is small,
but it must be the stochasticity of the sampler that is evaluated: docs/design.md §7.6). The pair's
endpoint difference is a finite-difference estimate of the direction in which the reward changes, and
it becomes a velocity target at every state either trajectory visited:

1. `ΔR = (R¹ − R²) / 2`, `d = (x0¹ − x0²) / 2`, `d̃ = d / sqrt(mean d²)` (unit mean square);
2. at every visited (x_t, t) of member 1: `v* = sg(v_old(x_t) − d̃)`;
3. `ρ = exp(−mean (v_θ − v*)² + mean d̃²)` (= 1 at θ_old; means over latent dims);
4. SPO-style penalised ratio (Xie et al., "Simple Policy Optimization"):
   `L = −ΔR ρ + |ΔR| / (2ε) (ρ − 1)²`, ε ≈ 0.03, averaged over the visited states.

Signs. Our flow models predict `v = ε − x0` and x̂0 = x_t − t v, so lowering v along d̃ raises x̂0
along d̃ = toward x0¹. At θ_old, ∂L/∂v_θ = 2 ΔR d̃ / D: gradient descent moves v_θ by −ΔR d̃, i.e.
the endpoint toward the higher-reward member (x0¹ if ΔR > 0, x0² if ΔR < 0); the penalty makes
ρ = 1 + ε·sign(ΔR) the per-state optimum, a trust region. `tests/test_algos.py` checks it on the real
models with a brightness reward: a few steps on one batch make the resampled endpoints (same seeds)
brighter, or darker for the negated reward, and move them toward each pair's better member (weighted by
|ΔR|). With the sign flipped, the digit reward falls in the learning regime of the tests (docs/design.md §11).

Member 2's states use the same formulas from its own side, ΔR² = −ΔR and d² = −d (first-order identical).
That is the same as `ΔR_i = R_i − mean_group R` and `d_i = x0_i − mean_group x0`, which is how it is
computed; groups larger than 2 then use group-centred rewards and endpoints (the paper's pairs are G = 2).

ε-models ("ddpm" family): the "velocity" is the model's own output, ε̂ (or v̂, or x̂0 for x0-prediction)
at the visited DDIM/DDPM state: `out* = sg(out_old + s d̃)` with s = sign ∂x̂0/∂out (−1 for ε and v
prediction, +1 for x0 prediction), so the target again moves x̂0 toward the better endpoint; ρ and L
are unchanged. This is a per-step rescaling of the flow version, not an equivalence: an ε step δ moves
x̂0 by √(1−ᾱ)/√ᾱ · δ (clipped by `clip_sample`), so the same ρ trust region allows larger endpoint moves
at high noise. Mapping ε̂ to the equivalent flow velocity instead would make ρ diverge as 1/√ᾱ at the
first step (ᾱ ≈ 2e-9 on the embedded cosine schedule). Both families are supported; the toy sign test
and a learning run (digits-eps, guidance 0.5, 1024 images; docs/design.md §11) pass on ε-models too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from agents.advantages import group_centred
from agents.algos.base import AlgoConfig, Algorithm, register_algorithm
from agents.losses import kl_terms, output_anchor, per_sample_mean, ratio_diagnostics
from agents.rollout import transitions
from diffenv.forward import x0_sign
from diffenv.validation import bounds


@dataclass
class FDFOConfig(AlgoConfig):
    group_size: int = field(default=2, metadata=bounds(ge=2))
    """rollouts per pair (the paper's G = 2; larger groups use group-centred differences)"""
    share_noise: bool = True
    """pair members start from the same x_T"""
    noise_level: float = 0.7
    """flow-SDE `a` of the rollout sampler: the churn that makes the pair diverge. The policy's own SDE level, so
    the rollouts are the sampler that is evaluated: at 0.2 the 3-step rollouts are nearly the ODE, already score
    0.999, and FDFO learned nothing that transferred (docs/design.md §7.6)"""
    eta: float = 1.0
    """DDIM η of the rollout sampler (ε-models): the churn; the policy's own η, for the same reason (at 0.2 and 0.5
    the digits-eps reward fell during training at lr 1e-3; at 1.0 it did not)"""
    minibatch_size: int = 256
    """visited states per optimizer step"""
    spo_eps: float = field(default=0.03, metadata=bounds(gt=0))
    """ε of the SPO penalty |ΔR| / (2ε) (ρ − 1)²"""
    dir_eps: float = field(default=1e-12, metadata=bounds(ge=0))
    """added to mean d² before the square root (identical endpoints give d̃ = 0)"""
    kl_coef: float = field(default=0.0, metadata=bounds(ge=0))
    """λ of an anchor to the base model, λ · mean ‖out_θ − out_ref‖² over the visited states (DiffusionNFT's
    form; 0, the paper's method, skips the reference forward). The SPO penalty bounds each epoch's step, not
    the total drift: on shapes FDFO drifts without bound and its judge score falls (docs/design.md §7.6)"""


@register_algorithm
class FDFO(Algorithm):
    name = "fdfo"
    visited_states = "all"
    Config = FDFOConfig

    def __init__(self, policy, cfg: FDFOConfig, dist=None):
        super().__init__(policy, cfg, dist)
        self.x0_sign = x0_sign(policy.backend.prediction_type)

    @torch.no_grad()
    def prepare(self, rollout: TensorDict) -> TensorDict:
        gid = rollout["group_ids"]
        rollout["reward_diffs"] = group_centred(rollout["rewards"], gid)  # ΔR_i, [B]
        d = group_centred(rollout["latents"][:, -1], gid)  # d_i, [B, C, H, W]
        rms = (per_sample_mean(d.pow(2)) + self.cfg.dir_eps).sqrt()
        rollout["directions"] = d / rms.view(-1, *([1] * (d.dim() - 1)))  # d̃_i
        items = transitions(rollout, stochastic_only=False)  # every visited state x_T … x_1
        items["targets"] = self._outputs(items) + self.x0_sign * items["directions"]  # v* = v_old − d̃ (flow, ε, v)
        if self.cfg.kl_coef > 0:
            items["ref_outputs"] = self._outputs(items, reference=True)
        return items

    def _outputs(self, items: TensorDict, reference: bool = False) -> torch.Tensor:
        """The network's output at every visited state, in minibatches (`reference`: the frozen base)."""
        return torch.cat([self.policy.model_output(mb["latents"], mb["step_index"], mb["conditions"], reference,
                                                   self.reference_scale(reference))
                          for mb in items.split(self.cfg.minibatch_size)])

    def loss(self, items: TensorDict) -> dict:
        v_theta = self.policy.model_output(items["latents"], items["step_index"], items["conditions"])
        dr, d = items["reward_diffs"], items["directions"]
        log_ratio = -per_sample_mean((v_theta - items["targets"]).pow(2)) + per_sample_mean(d.pow(2))
        ratio = log_ratio.exp()
        per_state = -dr * ratio + dr.abs() / (2 * self.cfg.spo_eps) * (ratio - 1).pow(2)
        out = {"loss_policy": per_state.mean()}  # the SPO objective: surrogate and trust-region penalty in one
        out |= ratio_diagnostics(log_ratio.detach())
        out["reward_diff_abs"] = dr.abs().mean().detach()
        if self.cfg.kl_coef > 0:
            out |= kl_terms(output_anchor(v_theta, items["ref_outputs"]), self.kl_coef_now())
        return out
