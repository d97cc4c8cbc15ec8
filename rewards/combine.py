"""Multi-objective rewards: a weighted sum `R = Σ_i w_i R_i` that keeps its parts inspectable."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rewards.base import Reward
from rewards.registry import as_reward, register


class WeightedSum(Reward):
    """`total = Σ_i w_i r_i(images, conditions)` over rewards given as `{reward_or_name: weight}`.

    Keys may be registered names, `Reward`s or plain callables (see `rewards.as_reward`).
    `components()` returns each *unweighted* component under its own name plus the total under
    `self.name`, so logs show what the agent trades off. Differentiable only if every component is.
    """

    def __init__(self, weights: Mapping[Any, float], name: str = "weighted_sum"):
        super().__init__()
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(f"WeightedSum needs a non-empty {{reward_or_name: weight}} mapping, got {weights!r}")
        rewards, coefficients = [], []
        for spec, weight in weights.items():
            reward = as_reward(spec)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of reward {reward.name!r} must be a finite number, got {weight!r}")
            rewards.append(reward)
            coefficients.append(float(weight))
        seen = [r.name for r in rewards]
        duplicates = sorted({n for n in seen if seen.count(n) > 1} | ({name} & set(seen)))
        if duplicates:
            raise ValueError(
                f"WeightedSum {name!r}: component names must be unique and differ from the sum's name, "
                f"got components {seen} (clashing: {duplicates})"
            )
        self.name = name
        self.rewards = nn.ModuleList(rewards)
        self.weights = coefficients
        self.differentiable = all(r.differentiable for r in rewards)

    def score(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        return self._weighted(self._parts(images, conditions))

    def components(self, images: torch.Tensor, conditions: torch.Tensor) -> dict[str, torch.Tensor]:
        images, conditions = self.check_inputs(images, conditions)
        with torch.set_grad_enabled(self.grad_enabled()):
            parts = self._parts(images, conditions)
            total = self.check_output(self._weighted(parts), images)
        return {**parts, self.name: total}

    def _parts(self, images: torch.Tensor, conditions: torch.Tensor) -> dict[str, torch.Tensor]:
        # each component call checks its own output, so a NaN names the component that made it
        return {reward.name: reward(images, conditions) for reward in self.rewards}

    def _weighted(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * value for w, value in zip(self.weights, parts.values()))

    def extra_repr(self) -> str:
        terms = " + ".join(f"{w:g}*{r.name}" for w, r in zip(self.weights, self.rewards))
        return f"{super().extra_repr()}, total={terms}"


@register("weighted_sum")
def weighted_sum(weights: Mapping[Any, float], name: str = "weighted_sum") -> WeightedSum:
    """E.g. `make("weighted_sum", weights={"digit_classifier": 1.0, "jpeg_compressibility": 0.1})`."""
    return WeightedSum(weights, name=name)
