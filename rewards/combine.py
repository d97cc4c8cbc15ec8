"""Multi-objective rewards: a weighted sum `R = Σ_i w_i R_i` that keeps its parts inspectable, and `as_reward`,
which turns any reward spec into a `Reward` (here because a weighted sum's parts are specs too)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rewards.base import CallableReward, Reward
from rewards.registry import make, names, register


class WeightedSum(Reward):
    """`total = Σ_i w_i r_i(images, conditions)` over rewards given as `{reward_or_name: weight}`.

    Keys may be registered names, `Reward`s or plain callables (see `rewards.as_reward`).
    `components()` returns each *unweighted* component under its own name plus the total under
    `self.name`, so logs show what the agent trades off. Differentiable only if every component is.

    Per-component normalisation (`normalize=True`): objectives on different scales (a CLIP cosine of
    ~0.3 next to an aesthetic score of ~6) are each standardised by running statistics before weighting,

        total = Σ_i w_i (r_i − m_i) / sqrt(v_i + eps),

    where `m_i`, `v_i` are the running mean and variance of component i over every batch seen so far
    (`momentum=None`, Chan et al.'s parallel update) or an exponential moving average (`momentum=β`:
    `m ← (1 − β) m + β mean_batch`). Statistics update with each call in training mode and are frozen
    by `reward.eval()`, like batch norm; they are buffers, so `state_dict()` saves them. With
    normalisation, `components()` also reports each standardised term as `"<name>/normalized"`.
    """

    def __init__(self, weights: Mapping[Any, float], name: str = "weighted_sum", normalize: bool = False,
                 momentum: float | None = None, eps: float = 1e-8):
        super().__init__()
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 < momentum <= 1):
            raise ValueError(f"momentum must be None (running average) or in (0, 1], got {momentum!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
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
        self.normalize, self.momentum, self.eps = bool(normalize), momentum, float(eps)
        n = len(rewards)
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.register_buffer("count", torch.zeros(()))

    def score(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        return self._weighted(self._standardized(self._parts(images, conditions)))

    def components(self, images: torch.Tensor, conditions: torch.Tensor) -> dict[str, torch.Tensor]:
        images, conditions = self.check_inputs(images, conditions)
        with torch.set_grad_enabled(self.grad_enabled()):
            parts = self._parts(images, conditions)
            terms = self._standardized(parts)
            total = self.check_output(self._weighted(terms), images)
        extra = {f"{k}/normalized": v for k, v in terms.items()} if self.normalize else {}
        return {**parts, **extra, self.name: total}

    @torch.no_grad()
    def update_statistics(self, parts: dict[str, torch.Tensor]) -> None:
        """Fold one batch of component values into the running mean/variance (population variance)."""
        batch = torch.stack([v.detach().float() for v in parts.values()]).to(self.running_mean.device)  # [n, B]
        n_b = batch.shape[1]
        mean_b, var_b = batch.mean(1), batch.var(1, unbiased=False)
        if self.momentum is not None and self.count > 0:
            m = self.momentum
            delta = mean_b - self.running_mean
            self.running_mean += m * delta
            self.running_var.copy_((1 - m) * (self.running_var + m * delta**2) + m * var_b)
        else:  # Chan et al. (1979): exact merge of two (count, mean, M2) summaries
            n_a = self.count
            total = n_a + n_b
            delta = mean_b - self.running_mean
            m2 = self.running_var * n_a + var_b * n_b + delta**2 * n_a * n_b / total
            self.running_mean += delta * n_b / total
            self.running_var.copy_(m2 / total)
        self.count += n_b

    def _standardized(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.normalize:
            return parts
        if self.training:
            self.update_statistics(parts)
        std = (self.running_var + self.eps).sqrt()
        return {k: ((v - self.running_mean[i].to(v.dtype)) / std[i].to(v.dtype))
                for i, (k, v) in enumerate(parts.items())}

    def _parts(self, images: torch.Tensor, conditions: torch.Tensor) -> dict[str, torch.Tensor]:
        # each component call checks its own output, so a NaN names the component that made it
        return {reward.name: reward(images, conditions) for reward in self.rewards}

    def _weighted(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * value for w, value in zip(self.weights, parts.values()))

    def extra_repr(self) -> str:
        terms = " + ".join(f"{w:g}*{r.name}" for w, r in zip(self.weights, self.rewards))
        return f"{super().extra_repr()}, total={terms}" + (", normalize=True" if self.normalize else "")


@register("weighted_sum")
def weighted_sum(weights: Mapping[Any, float], name: str = "weighted_sum", normalize: bool = False,
                 momentum: float | None = None) -> WeightedSum:
    """E.g. `make("weighted_sum", weights={"digit_classifier": 1.0, "jpeg_compressibility": 0.1})`;
    `normalize=True` standardises each component by running statistics before weighting."""
    return WeightedSum(weights, name=name, normalize=normalize, momentum=momentum)


def as_reward(spec: Any, device: str | torch.device = "cpu") -> Reward:
    """Turn a spec into a `Reward` on `device`.

    | spec | result |
    |---|---|
    | registered name (`str`) | `make(spec, device)` |
    | `Reward` | the same object, moved to `device` in place |
    | `{reward_or_name: weight}` | `WeightedSum(spec)` |
    | other callable `fn(images, conditions)` | `CallableReward(fn)` (not differentiable) |
    """
    if isinstance(spec, str):
        return make(spec, device=device)
    if isinstance(spec, Reward):
        return spec.to(device)
    if isinstance(spec, Mapping):
        return WeightedSum(spec).to(device)
    if callable(spec):
        return CallableReward(spec).to(device)
    raise TypeError(
        f"cannot make a reward from {type(spec).__name__}; expected a registered name (one of {names()}), "
        f"a Reward, a {{name: weight}} dict or a callable fn(images, conditions)"
    )
