"""DGPO (Luo, Hu & Tang 2025, "Reinforcing Diffusion Models by Direct Group Preference Optimization",
arXiv 2510.08425), written from the paper's equations (docs/design.md §7.8).

GRPO's gain comes from the relative preferences inside a group, not from the policy gradient; DGPO keeps the
first and drops the second. A group's samples (one condition c, rewards R_i, group advantages A_i) are split into
a positive set G⁺ (A_i > 0) and a negative set G⁻ (A_i < 0), and the policy maximises the Bradley–Terry
likelihood that G⁺ is preferred to G⁻, with DPO's implicit reward r_θ(x) = β log π_θ(x | c) / π_ref(x | c).
Weighting each sample by |A_i| with equal total weight on both sides (here Σ_{G⁺} w = Σ_{G⁻} w = 1) makes the
intractable partition function of the implicit reward cancel, so the group comparison has the closed form

    L = −E log σ( Σ_{i∈G⁺} w_i r_θ(x_i) − Σ_{j∈G⁻} w_j r_θ(x_j) ) = −E log σ( Σ_i ŵ_i r_θ(x_i) ),
    ŵ_i = A_i / Σ_{G⁺} A on G⁺,  A_j / Σ_{G⁻} |A| on G⁻  (signed; A = 0 samples carry no weight).

As in Diffusion-DPO, the log-likelihood ratio is replaced by its ELBO bound at one forward-process draw, the
model's own training loss ℓ(x) = mean ‖f(x_t, t, c) − target(x0, ε)‖² at x_t = noise(x0, t, ε):
`r_θ(x) ≈ −β (ℓ_θ(x) − ℓ_ref(x))`. The draw (t, ε) is shared by the whole group (the pair of Diffusion-DPO),
and t is drawn from [`time_min`, 1) — the paper's timestep clip, which keeps the update off the lowest noise
levels, where fitting the fine detail of few-step generated images fits their artefacts. Per (group, draw) unit:

    margin = −β Σ_i ŵ_i (ℓ_θ(x_i) − ℓ_ref(x_i)),   loss_policy = mean_units s · softplus(−margin),

softplus(−m) = −log σ(m), and s = mean_i |A_i| the group's weight (ours, not the paper's): z-scored advantages
give s ≈ 0.8 to a group whose reward spread is well above `adv_eps` and s → 0 below it, so a group of near-ties,
whose ŵ would otherwise give the rounding of its rewards a full comparison, counts as little as in GRPO.

With groups of 2 the weights are ±1 and this is Diffusion-DPO's pairwise loss on the better / worse sample (times
s). The gradient, s σ(−margin) β Σ_i ŵ_i ∂ℓ_θ(x_i), fits the positives like training data and unlearns the negatives,
until the margin saturates the sigmoid: β sets how far the implicit reward may move from the reference (a
trust region, as β of DPO). Zero advantages give a zero gradient (ŵ = 0).

No likelihood of a visited transition is used — only the final samples x0 — so rollouts can be deterministic
(the ODE sampler: `eta = 0`, `noise_level = 0`, the defaults here, the paper's point) and take fewer steps than
evaluation. The reference `reference="base"` is the frozen base (DPO's and the paper's regularised objective
max E[R] − β KL(π ‖ π_ref)); with `ref_guidance_scale = w` it is the base *run with CFG* (its ELBO taken on the
guided output), so the optimum is the guided base tilted toward the reward. `"old"` compares with the rollout's
own weights (a fresh trust region every epoch). An optional anchor `kl_coef · mean ‖f_θ − f_ref‖²` to the base
(`loss_kl`) is the same as AWM's and DiffusionNFT's.

Items are groups: `prepare` returns a TensorDict with batch `[units, group_size]` (one unit per (group, draw)),
so the trainer's shuffle and `minibatch_size` act on whole groups — a minibatch of m units is m · group_size
network rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from agents.advantages import group_advantages
from agents.algos.base import AlgoConfig, Algorithm, register_algorithm
from agents.losses import kl_terms, output_anchor, per_sample_mean
from diffenv.forward import ForwardProcess
from diffenv.validation import SEED, bounds


@dataclass
class DGPOConfig(AlgoConfig):
    minibatch_size: int = 4
    """(group, draw) units per optimizer step: each is group_size network rows (4 × 8 = 32 rows by default)"""
    eta: float = 0.0
    """DDIM η of the rollouts: 0, the deterministic sampler (DGPO needs no stochastic policy)"""
    noise_level: float = 0.0
    """flow-SDE `a` of the rollouts: 0, the ODE"""
    beta: float = field(default=1000.0, metadata=bounds(gt=0))
    """β of the implicit reward β log π_θ/π_ref, in units of the per-dim mean training loss (Diffusion-DPO's scale);
    larger moves further from the reference before the sigmoid saturates"""
    reference: Literal["base", "old"] = "base"
    """π_ref: the frozen base (with `ref_guidance_scale`, run with CFG), or the rollout's own weights ("old")"""
    n_draws: int = field(default=2, metadata=bounds(ge=1))
    """forward-process (t, ε) draws per group, each shared by the group's members"""
    time_min: float = field(default=0.1, metadata=bounds(ge=0, lt=1))
    """timestep clip: t ~ U(time_min, 1) (1 = pure noise); 0 trains on every noise level"""
    adv_eps: float = field(default=0.05, metadata=bounds(gt=0))
    """added to the group std of the advantages (a soft floor, as GRPO's and DiffusionNFT's)"""
    kl_coef: float = field(default=0.0, metadata=bounds(ge=0))
    """λ of an extra anchor λ · mean ‖f_θ − f_ref‖² to the (guided) base (0: none)"""
    seed: int = field(default=0, metadata=SEED)
    """seed of the algorithm's generator for the forward-process draws (each rank's own: `stream_seed`)"""


def preference_weights(advantages: torch.Tensor) -> torch.Tensor:
    """ŵ [n, G] per group row: A_i / Σ_{A>0} A on the positive set and A_j / Σ_{A<0} |A| on the negative set, so each
    side weighs exactly 1 (the partition function cancels only when both sides weigh the same; normalising the two
    sides separately keeps that when the rounding of the group mean leaves Σ A ≠ 0). A group with an empty side
    (all advantages 0) weighs nothing."""
    pos, neg = advantages.clamp(min=0), (-advantages).clamp(min=0)
    pos_mass, neg_mass = pos.sum(1, keepdim=True), neg.sum(1, keepdim=True)
    both = (pos_mass > 0) & (neg_mass > 0)
    tiny = torch.finfo(advantages.dtype).tiny
    return torch.where(both, pos / pos_mass.clamp(min=tiny) - neg / neg_mass.clamp(min=tiny), 0.0)


@register_algorithm
class DGPO(Algorithm):
    name = "dgpo"
    Config = DGPOConfig
    visited_states = None  # forward-process draws of x0

    def __init__(self, policy, cfg: DGPOConfig, dist=None):
        super().__init__(policy, cfg, dist)
        if cfg.group_size < 2:
            raise ValueError(f"dgpo compares samples within a group: group_size={cfg.group_size}: expected an "
                             "int >= 2")
        if cfg.reference == "old" and cfg.ref_guidance_scale != 1.0 and cfg.kl_coef == 0:
            raise ValueError(f"dgpo: ref_guidance_scale={cfg.ref_guidance_scale} guides the base reference; with "
                             "reference='old' and kl_coef=0 no forward uses it: expected reference='base' or "
                             "kl_coef > 0")
        self.process = ForwardProcess.of(policy.backend)
        self.generator = torch.Generator(device=policy.device)
        self.generator.manual_seed(self.dist.stream_seed(cfg.seed, "algorithm"))

    # ------------------------------------------------------------------ prepare: groups, weights, draws, ℓ_ref
    @torch.no_grad()
    def prepare(self, rollout: TensorDict) -> TensorDict:
        g = self.cfg.group_size
        adv = group_advantages(rollout["rewards"], rollout["group_ids"], self.cfg.adv_eps)
        order = torch.argsort(rollout["group_ids"], stable=True)  # consecutive sub-envs already; made sure here
        n_groups = len(order) // g
        x0 = rollout["latents"][order, -1].view(n_groups, g, *rollout["latents"].shape[2:])
        units = torch.arange(n_groups, device=x0.device).repeat_interleave(self.cfg.n_draws)  # [U]
        u, eps = self.process.draw(len(units), x0.shape[2:], self.generator)
        u = self.cfg.time_min + (1 - self.cfg.time_min) * u
        x0_u = x0[units]  # [U, G, C, H, W]
        times = u[:, None].expand(-1, g)
        noises = eps[:, None].expand(-1, g, *eps.shape[1:])
        x_t, timesteps = self.process.noise(x0_u.flatten(0, 1), times.reshape(-1), noises.reshape(-1, *eps.shape[1:]))
        per_group = {k: rollout[k][order].view(n_groups, g)[units] for k in ("conditions", "group_ids", "rewards")}
        items = TensorDict({"x0": x0_u, "latents": x_t.view_as(x0_u), "timesteps": timesteps.view(len(units), g),
                            "times": times.contiguous(), "noises": noises.contiguous(), **per_group,
                            "advantages": adv[order].view(n_groups, g)[units]},
                           batch_size=[len(units), g], device=x0.device)
        items["weights"] = preference_weights(items["advantages"])
        base_outputs = None
        if self.cfg.reference == "base" or self.cfg.kl_coef > 0:
            base_outputs = self._outputs(items, reference=True)
        ref_outputs = base_outputs if self.cfg.reference == "base" else self._outputs(items)
        items["ref_losses"] = self.matching_loss(ref_outputs, items)
        if self.cfg.kl_coef > 0:
            items["base_outputs"] = base_outputs
        return items

    def _outputs(self, items: TensorDict, reference: bool = False) -> torch.Tensor:
        """Network outputs [U, G, C, H, W] of every row, `minibatch_size` units per call."""
        return torch.cat([self._forward(mb, reference) for mb in items.split(self.cfg.minibatch_size)])

    def _forward(self, items: TensorDict, reference: bool = False) -> torch.Tensor:
        flat = items.reshape(-1)
        out = self.policy.predict(flat["latents"], flat["timesteps"], flat["conditions"], reference,
                                  self.reference_scale(reference))
        return out.view(*items.batch_size, *out.shape[1:])

    def matching_loss(self, output: torch.Tensor, items: TensorDict) -> torch.Tensor:
        """ℓ = mean over latent dims of (f − target)², the model's training loss at the draw: [U, G]."""
        target = self.process.target(items["x0"].flatten(0, 1), items["times"].reshape(-1),
                                     items["noises"].flatten(0, 1))
        return per_sample_mean((output.flatten(0, 1) - target).pow(2)).view(items.batch_size)

    # ------------------------------------------------------------------ the loss
    def loss(self, items: TensorDict) -> dict:
        output = self._forward(items)
        ell = self.matching_loss(output, items)
        margin = -self.cfg.beta * (items["weights"] * (ell - items["ref_losses"])).sum(1)  # [U]
        group_weight = items["advantages"].abs().mean(1)  # s
        out = {"loss_policy": (group_weight * F.softplus(-margin)).mean()}
        if self.cfg.kl_coef > 0:
            out |= kl_terms(output_anchor(output.flatten(0, 1), items["base_outputs"].flatten(0, 1)),
                            self.kl_coef_now())
        with torch.no_grad():
            out["margin_mean"] = margin.mean()
            out["preference_accuracy"] = (margin > 0).float().mean()
            out["matching_loss"] = ell.mean()
        return out

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
