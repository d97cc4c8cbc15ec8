"""DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning").

Denoising as a K-step MDP; the policy step is `π_θ(x_{t−1}|x_t, c) = N(μ_θ, σ_t² I)`.
- advantages: per-condition running statistics, `A = clip((R − mean_c)/(std_c + 1e-6), ±5)`
  (a small buffer per condition; batch statistics until it fills);
- DDPO_IS (PPO-clip): `ρ_t = exp(log π_θ − log π_old)`, `L = E_{i,t} max(−A ρ_t, −A clip(ρ_t, 1±ε))`;
- DDPO_SF (REINFORCE, `reinforce=True`): `L = −E[A Σ_t log π_θ]`.

Log-probs are exact sums over latent dims (DDPO's code averages them, which forces ε ≈ 1e-4 and
biases E[ρ]); a summed log-ratio moves ~D times faster per parameter step, so ε is the usual 0.2
with a LoRA learning rate small enough that few transitions clip (watch `clip_frac`).
Works on both families (flow models through the flow-SDE sampler, as in Flow-GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tensordict import TensorDict

from agents.advantages import PerConditionStats
from agents.algos.base import AlgoConfig, Algorithm, register_algorithm
from agents.losses import clipped_surrogate
from agents.rollout import transitions
from diffenv.validation import bounds


@dataclass
class DDPOConfig(AlgoConfig):
    clip_range: float = field(default=0.2, metadata=bounds(gt=0))
    """PPO ε on the exact (summed) per-step ratio"""
    adv_clip: float = field(default=5.0, metadata=bounds(gt=0))
    """advantage clip"""
    stat_buffer_size: int = field(default=32, metadata=bounds(ge=1))
    """rewards kept per condition"""
    stat_min_count: int = field(default=16, metadata=bounds(ge=1))
    """rewards a condition needs before its own statistics replace the batch's"""
    reinforce: bool = False
    """score-function variant (DDPO_SF): no ratio, no clipping"""


@register_algorithm
class DDPO(Algorithm):
    name = "ddpo"
    reference_term = False
    Config = DDPOConfig

    def __init__(self, policy, cfg: DDPOConfig, dist=None):
        super().__init__(policy, cfg, dist)
        self.stats = PerConditionStats(cfg.stat_buffer_size, cfg.stat_min_count, cfg.adv_clip)

    def prepare(self, rollout: TensorDict) -> TensorDict:
        # statistics over every rank's samples, then this rank's slice of the advantages
        rewards, conditions = self.dist.all_gather(rollout["rewards"]), self.dist.all_gather(rollout["conditions"])
        adv = self.stats.advantages(rewards, conditions)
        rollout["advantages"] = self.dist.local_slice(adv)
        return transitions(rollout)

    def loss(self, items: TensorDict) -> dict:
        log_prob = self.policy.log_prob(items["next_latents"], items["latents"], items["step_index"],
                                        items["conditions"])
        if self.cfg.reinforce:
            return {"loss_policy": -(items["advantages"] * log_prob).mean()}
        late = items["step_index"] >= self.policy.num_steps // 2
        return clipped_surrogate(log_prob - items["log_probs"], items["advantages"], self.cfg.clip_range, late)

    def state_dict(self):
        return {"stats": self.stats.state_dict()}

    def load_state_dict(self, state):
        self.stats.load_state_dict(state["stats"])
