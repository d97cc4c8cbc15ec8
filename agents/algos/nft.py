"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
arXiv 2509.16117).

Reinforcement on the forward process, without likelihoods or trajectories: only the final samples x0
and their rewards are used. Per sample (and per (t, ε) draw, made in `prepare`):

1. r = clip(A / (2 A_max) + ½, 0, 1), A the group advantage (r = ½ is "no preference");
2. noise the final sample: `x_t = (1 − t) x0 + t ε`, t ~ U(0, 1);
3. implicit positive and negative policies around the old one (β > 0):
   `v⁺ = β v_θ + (1 − β) v_old`, `v⁻ = (1 + β) v_old − β v_θ`;
4. `x̂0^± = x_t − t v^±`, `w^± = sg(mean |x̂0^± − x0|)` (adaptive weight, clipped at 1e-5);
   `L = [r ‖x̂0⁺ − x0‖² / w⁺ + (1 − r) ‖x̂0⁻ − x0‖² / w⁻] / β  (+ λ ‖v_θ − v_ref‖²)`, ‖·‖² a mean
   over latent dims, v_ref the adapter-disabled (base) model (terms `loss_policy` and `loss_kl`).

At θ = θ_old the loss is `mean ‖x̂0_old − x0‖² / w_old / β` whatever r, and its gradient is
∝ `t (1 − 2r) (x̂0_old − x0) / w_old · ∂v_θ` (β cancels): r > ½ pulls x̂0 toward the sample, r < ½
pushes it away, and r = ½ gives a zero gradient (the positive and negative terms cancel).

Old policy. v_old comes from an EMA of the LoRA tensors kept here (swapped into the network under
no_grad in `prepare`, so it is fixed within an epoch, as in the paper's algorithm), updated after
every optimizer step with decay `min(ema_ramp · steps, ema_decay)` — a ramp from 0 (old = current) in
the spirit of DiffusionNFT's schedule. As in the paper, rollouts are collected with θ_old
(`collect_with_old=True`, via `collect_context`); `False` collects with θ.

ε-models ("ddpm" family): the noising is the model's own DDPM forward process `x_τ = √ᾱ x0 + √(1−ᾱ) ε`
(τ uniform over the training timesteps) and the residuals are taken in the model's output space
(ε̂^± − ε for an ε-model). Mixing outputs is exactly mixing velocities (x̂0 and v are affine in the
output, with output-independent coefficients, and the mixing weights sum to 1). Since
`ε̂ − ε = −√ᾱ/√(1−ᾱ) · (x̂0 − x0)`, with the adaptive weight the ε-space loss is the x0-space loss times
√ᾱ/√(1−ᾱ): the same algorithm with a per-timestep weight that removes the 1/√ᾱ blow-up of an
ε-model's x̂0 at high noise. Both families are supported (digits-eps learns too; figures in
docs/design.md §11).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from agents.advantages import group_advantages
from agents.algos.base import AlgoConfig, Algorithm, register_algorithm
from agents.losses import kl_terms, output_anchor, per_sample_mean
from agents.rollout import forward_draws
from diffenv.forward import ForwardProcess
from diffenv.validation import SEED, bounds


@dataclass
class NFTConfig(AlgoConfig):
    minibatch_size: int = 64
    """(sample, draw) items per optimizer step"""
    beta: float = field(default=1.0, metadata=bounds(gt=0))
    """β > 0: how far the implicit policies v^± sit from v_old (1: v⁺ = v_θ)"""
    adv_clip_max: float = field(default=5.0, metadata=bounds(gt=0))
    """A_max: r = clip(A / (2 A_max) + ½, 0, 1)"""
    adv_eps: float = field(default=0.05, metadata=bounds(gt=0))
    """added to the group std: a soft floor, as GRPO's (digits-eps FD after 4,096 images 17.5 -> 3.8; digits-flow
    unchanged: docs/design.md §7.5)"""
    n_draws: int = field(default=2, metadata=bounds(ge=1))
    """(t, ε) forward-process draws per sample"""
    kl_coef: float = field(default=0.0, metadata=bounds(ge=0))
    """λ of ‖v_θ − v_ref‖² (0 disables the reference forward)"""
    ema_decay: float = field(default=0.5, metadata=bounds(ge=0, lt=1))
    """final EMA decay of the old policy (0: old = current)"""
    ema_ramp: float = field(default=0.001, metadata=bounds(ge=0))
    """old-policy decay after n optimizer steps is min(ema_ramp · n, ema_decay)"""
    collect_with_old: bool = True
    """collect rollouts with the EMA old policy, as the paper does (False: with the current θ)"""
    seed: int = field(default=0, metadata=SEED)
    """seed of the algorithm's generator for the (t, ε) draws (each rank's own: `stream_seed`)"""


@contextmanager
def swapped_in(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> Iterator[None]:
    """Temporarily copy `values` into `params` (e.g. an EMA old policy); the originals come back exactly."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@register_algorithm
class DiffusionNFT(Algorithm):
    name = "nft"
    visited_states = None  # forward-process draws of x0
    Config = NFTConfig

    def __init__(self, policy, cfg: NFTConfig, dist=None):
        super().__init__(policy, cfg, dist)
        self.process = ForwardProcess.of(policy.backend)
        self.generator = torch.Generator(device=policy.device)
        self.generator.manual_seed(self.dist.stream_seed(cfg.seed, "algorithm"))
        self.params = policy.trainable_parameters()
        self.ema = [p.detach().clone() for p in self.params]  # the old policy's LoRA tensors
        self.updates = 0

    # ------------------------------------------------------------------ prepare: r, x_t, v_old
    @torch.no_grad()
    def prepare(self, rollout: TensorDict) -> TensorDict:
        adv = group_advantages(rollout["rewards"], rollout["group_ids"], self.cfg.adv_eps)
        rollout["advantages"] = adv
        rollout["r"] = adv.clamp(-self.cfg.adv_clip_max, self.cfg.adv_clip_max) / (2 * self.cfg.adv_clip_max) + 0.5
        items = forward_draws(rollout, self.cfg.n_draws, self.process, self.generator)
        with swapped_in(self.params, self.ema):
            items["old_outputs"] = self._outputs(items)
        if self.cfg.kl_coef > 0:
            items["ref_outputs"] = self._outputs(items, reference=True)
        return items

    def collect_context(self):
        """DiffusionNFT samples with the old (EMA) policy: swap its LoRA tensors in while collecting."""
        return swapped_in(self.params, self.ema) if self.cfg.collect_with_old else super().collect_context()

    def _outputs(self, items: TensorDict, reference: bool = False) -> torch.Tensor:
        return torch.cat([self.policy.predict(mb["latents"], mb["timesteps"], mb["conditions"], reference,
                                              self.reference_scale(reference))
                          for mb in items.split(self.cfg.minibatch_size)])

    def residual(self, output: torch.Tensor, items: TensorDict) -> torch.Tensor:
        """Flow: x̂0(output) − x0 (the paper's x0 space); ε-models: output − target (module docstring)."""
        if self.process.family == "flow":
            return self.process.pred_x0(output, items["latents"], items["times"]) - items["x0"]
        return output - self.process.target(items["x0"], items["times"], items["noises"])

    # ------------------------------------------------------------------ the loss, in the paper's order
    def loss(self, items: TensorDict) -> dict:
        beta, r = self.cfg.beta, items["r"]
        v_theta = self.policy.predict(items["latents"], items["timesteps"], items["conditions"])
        v_old = items["old_outputs"]
        v_pos = beta * v_theta + (1 - beta) * v_old
        v_neg = (1 + beta) * v_old - beta * v_theta
        res_pos, res_neg = self.residual(v_pos, items), self.residual(v_neg, items)
        with torch.no_grad():
            w_pos = per_sample_mean(res_pos.abs()).clamp(min=1e-5)
            w_neg = per_sample_mean(res_neg.abs()).clamp(min=1e-5)
        per_item = (r * per_sample_mean(res_pos.pow(2)) / w_pos
                    + (1 - r) * per_sample_mean(res_neg.pow(2)) / w_neg) / beta
        out = {"loss_policy": per_item.mean()}
        if self.cfg.kl_coef > 0:
            out |= kl_terms(output_anchor(v_theta, items["ref_outputs"]), self.kl_coef_now())
        with torch.no_grad():
            out["old_deviate"] = per_sample_mean((v_theta - v_old).pow(2)).mean()
            out["r_mean"] = r.mean()
        return out

    # ------------------------------------------------------------------ the EMA old policy
    @property
    def ema_decay_now(self) -> float:
        return min(self.cfg.ema_ramp * self.updates, self.cfg.ema_decay)

    @torch.no_grad()
    def after_update(self) -> None:
        self.updates += 1
        d = self.ema_decay_now
        for e, p in zip(self.ema, self.params):
            e.mul_(d).add_(p.detach(), alpha=1 - d)

    def state_dict(self):
        return {"generator": self.generator.get_state(), "ema": [e.clone() for e in self.ema],
                "updates": self.updates}

    def load_state_dict(self, state):
        if len(state["ema"]) != len(self.ema):
            raise ValueError(f"NFT state has {len(state['ema'])} EMA tensors; this policy has "
                             f"{len(self.ema)} LoRA tensors")
        self.generator.set_state(state["generator"])
        for e, s in zip(self.ema, state["ema"]):
            e.copy_(s)
        self.updates = int(state["updates"])
