"""AWM (Xue et al. 2025, "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models",
arXiv 2509.25050), written from the paper's equations (docs/design.md §7.7).

The paper shows that DDPO's per-step likelihood is denoising score matching with a *noisy* target (x_{t−1}
instead of x0), which adds variance; AWM keeps the policy gradient but scores each generated image with the
pretraining loss on its clean x0. Per sample i (final latent x0, condition c, group advantage A_i) and per draw j:

1. a forward-process draw, shared by θ_old and θ: step k_j uniform over the sampler's K steps (the paper's
   "discrete" time sampling; `time_sampling="uniform"`: u ~ U(0, 1)), ε_j ~ N(0, I), x_j = noise(x0, u_j, ε_j);
2. `log p_θ(x0 | c) ≈ −‖f_θ(x_j, t_j, c) − target(x0, ε_j)‖²` (mean over latent dims), the model's own training
   loss with uniform weight w(t) = 1 (flow: target ε − x0; ε-models: ε), an ELBO surrogate of the sample's
   log-likelihood; `log ρ_j = log p_θ − log p_old` (= 0 at θ_old, `prepare`);
3. `Â_i = clip(A_i, ±A_max) / A_max` ∈ [−1, 1]; `L = E_j max(−Â ρ_j, −Â clip(ρ_j, 1 ± ε))` (ratio per draw,
   the paper's code's "exp first"; ε = 1 by default, nearly unclipped: the paper omits the clip);
4. `+ β · mean ‖f_θ − f_ref‖²` (velocity-space KL to the base, the `loss_kl` term).

At θ_old the gradient is `Â · ∂‖f_θ − target‖²`: an advantage-weighted version of pretraining — high-reward
images are fit like training data, low-reward ones unlearned. Zero advantages give a zero policy gradient.
Any rollout sampler works (only x0 and c are used), so rollouts can take fewer steps than evaluation, and both
model families are supported. Unlike FPO (the CFM loss averaged over draws inside one ratio, flow models only,
ε = 0.05, no reference term), AWM takes one ratio per draw, scales advantages to [−1, 1] and anchors to the base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from tensordict import TensorDict

from agents.advantages import group_advantages
from agents.algos.base import AlgoConfig, Algorithm, register_algorithm
from agents.losses import clipped_surrogate, kl_terms, output_anchor, per_sample_mean
from agents.rollout import forward_draws
from diffenv.forward import ForwardProcess
from diffenv.validation import SEED, bounds


@dataclass
class AWMConfig(AlgoConfig):
    minibatch_size: int = 64
    """(sample, draw) items per optimizer step"""
    n_draws: int = field(default=4, metadata=bounds(ge=1))
    """forward-process draws per sample (the paper trains on 4-6 timesteps per image)"""
    time_sampling: Literal["steps", "uniform"] = "steps"
    """where the draws' noise levels lie: the rollout sampler's K step timesteps, uniformly ("steps", the paper's
    discrete sampling) or u ~ U(0, 1) over the training schedule ("uniform")"""
    clip_range: float = field(default=1.0, metadata=bounds(gt=0))
    """PPO ε on the per-draw ratio (1: nearly unclipped, as the paper's released configuration)"""
    adv_clip_max: float = field(default=5.0, metadata=bounds(gt=0))
    """A_max: Â = clip(A, ±A_max) / A_max"""
    adv_eps: float = field(default=0.05, metadata=bounds(gt=0))
    """added to the group std: a soft floor, as GRPO's and DiffusionNFT's"""
    kl_coef: float = field(default=0.1, metadata=bounds(ge=0))
    """β of the velocity-space KL, mean ‖f_θ − f_ref‖² (0 disables the reference forward)"""
    seed: int = field(default=0, metadata=SEED)
    """seed of the algorithm's generator for the forward-process draws (each rank's own: `stream_seed`)"""


@register_algorithm
class AWM(Algorithm):
    name = "awm"
    Config = AWMConfig
    visited_states = None  # forward-process draws of x0

    def __init__(self, policy, cfg: AWMConfig, dist=None):
        super().__init__(policy, cfg, dist)
        self.process = ForwardProcess.of(policy.backend)
        self.generator = torch.Generator(device=policy.device)
        self.generator.manual_seed(self.dist.stream_seed(cfg.seed, "algorithm"))
        # u of each sampler step: the forward process's network timestep there is the sampler's model timestep
        shift = 0.5 if self.process.family == "ddpm" else 0.0  # ddpm: τ = ⌊u T⌋ lands on the integer timestep
        self.step_times = (policy.sampler.model_timesteps.double() + shift) / self.process.num_train_timesteps

    def draw_times(self, u: torch.Tensor) -> torch.Tensor:
        """u ~ U(0, 1) mapped to the configured time distribution (uniform over the sampler's steps, or itself)."""
        if self.cfg.time_sampling == "uniform":
            return u
        k = (u * len(self.step_times)).long().clamp(max=len(self.step_times) - 1)
        return self.step_times.to(u.device)[k].to(u.dtype)

    def log_likelihood(self, output: torch.Tensor, items: TensorDict) -> torch.Tensor:
        """The ELBO surrogate −‖f − target‖², mean over latent dims: [n]."""
        target = self.process.target(items["x0"], items["times"], items["noises"])
        return -per_sample_mean((output - target).pow(2))

    @torch.no_grad()
    def prepare(self, rollout: TensorDict) -> TensorDict:
        adv = group_advantages(rollout["rewards"], rollout["group_ids"], self.cfg.adv_eps)
        rollout["advantages"] = adv.clamp(-self.cfg.adv_clip_max, self.cfg.adv_clip_max) / self.cfg.adv_clip_max
        items = forward_draws(rollout, self.cfg.n_draws, self.process, self.generator, self.draw_times)
        items["old_log_probs"] = torch.cat([self.log_likelihood(self._outputs(mb), mb)
                                            for mb in items.split(self.cfg.minibatch_size)])
        if self.cfg.kl_coef > 0:
            items["ref_outputs"] = torch.cat([self._outputs(mb, reference=True)
                                              for mb in items.split(self.cfg.minibatch_size)])
        return items

    def _outputs(self, items: TensorDict, reference: bool = False) -> torch.Tensor:
        return self.policy.predict(items["latents"], items["timesteps"], items["conditions"], reference,
                                   self.reference_scale(reference))

    def loss(self, items: TensorDict) -> dict:
        output = self._outputs(items)
        log_p = self.log_likelihood(output, items)
        out = clipped_surrogate(log_p - items["old_log_probs"], items["advantages"], self.cfg.clip_range)
        if self.cfg.kl_coef > 0:
            out |= kl_terms(output_anchor(output, items["ref_outputs"]), self.kl_coef_now())
        out["matching_loss"] = -log_p.detach().mean()
        return out

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
