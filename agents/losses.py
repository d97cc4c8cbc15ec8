"""The loss-term contract every algorithm follows, and the pieces several losses share (docs/design.md §7).

`Algorithm.loss(items)` returns a flat dict of scalar tensors, TorchRL's convention (`torchrl.objectives`):

- `loss_<name>`: an already-weighted term that keeps its graph (`loss_policy`, `loss_kl` = β·KL, …); the
  objective is their sum, `total_loss(terms)`, which is what the trainer backpropagates;
- every other key: a detached diagnostic (`ratio_mean`, `clip_frac`, `approx_kl`, `ess`, the unweighted
  `kl_to_ref`, …), logged as it is.

`DeviceMeans` is how the trainer averages them over an epoch without reading any value per minibatch.
"""

from __future__ import annotations

import math

import torch

LOSS_PREFIX = "loss_"


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The objective: the sum of the `loss_*` terms, in the order the loss returned them."""
    losses = [v for k, v in terms.items() if k.startswith(LOSS_PREFIX)]
    if not losses:
        raise ValueError(f"a loss returned no {LOSS_PREFIX}* term; got keys {sorted(terms)}")
    total = losses[0]
    for term in losses[1:]:
        total = total + term
    return total


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dims: [B, ...] -> [B]."""
    return x.flatten(1).mean(1)


def gaussian_kl_equal_std(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²I) ‖ N(μ_ref, σ²I)) = ‖μ − μ_ref‖² / (2σ²), summed over dims: [B] (σ [B])."""
    sq = (mean - ref_mean).pow(2).flatten(1).sum(1)
    return sq / (2 * std.pow(2))


def output_anchor(output: torch.Tensor, ref_output: torch.Tensor) -> torch.Tensor:
    """mean ‖f_θ − f_ref‖² (over latent dims, then samples): DiffusionNFT's reference term, also FDFO's anchor."""
    return per_sample_mean((output - ref_output).pow(2)).mean()


def kl_terms(kl: torch.Tensor, coef: float) -> dict[str, torch.Tensor]:
    """A reference term in the contract's two forms: `loss_kl` = coef · kl (keeps its graph), `kl_to_ref` = kl."""
    return {"loss_kl": coef * kl, "kl_to_ref": kl.detach()}


@torch.no_grad()
def ratio_diagnostics(log_ratio: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached statistics of importance ratios ρ = exp(log ρ) [B] (TorchRL's PPO reports the same):

    `ratio_mean/max/min`; `approx_kl` = mean((ρ − 1) − log ρ), Schulman's k3 estimator of KL(old ‖ new);
    `ess` = (Σρ)² / (B Σρ²) ∈ (0, 1], the normalised effective sample size (1: all ratios equal).
    """
    ratio = log_ratio.exp()
    log_ess = 2 * torch.logsumexp(log_ratio, 0) - torch.logsumexp(2 * log_ratio, 0) - math.log(len(log_ratio))
    return {"ratio_mean": ratio.mean(), "ratio_max": ratio.max(), "ratio_min": ratio.min(),
            "approx_kl": ((ratio - 1) - log_ratio).mean(), "ess": log_ess.exp()}


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                      late_steps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """PPO-clip (Schulman et al. 2017, eq. 7): `loss_policy = E max(−A ρ, −A clip(ρ, 1 ± ε))`, with the ratio
    diagnostics and `clip_frac` = mean 1[|ρ − 1| > ε].

    `late_steps` (bool [B], per-step algorithms): also report the clip fraction of the early and late
    denoising steps separately — with exact summed log-probs the low-noise late steps move the ratio most.
    """
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    out = {"loss_policy": torch.maximum(unclipped, clipped).mean()}
    with torch.no_grad():
        out |= ratio_diagnostics(log_ratio.detach())
        outside = ((ratio - 1).abs() > clip_range).float()
        out["clip_frac"] = outside.mean()
        if late_steps is not None:
            out["clip_frac_early"] = _masked_mean(outside, ~late_steps)
            out["clip_frac_late"] = _masked_mean(outside, late_steps)
    return out


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


class DeviceMeans:
    """Means of scalar tensors added over an epoch, kept on their device until `read()` brings them all to the
    host in one transfer (one host sync, instead of one `float()` per value per minibatch)."""

    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {}

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.values.setdefault(k, []).append(v.detach().reshape(()))

    def read(self) -> dict[str, float]:
        """{key: mean of its values}, each value read as a float64 (float32 on MPS, which has no float64)."""
        flat = [v for vs in self.values.values() for v in vs]
        if not flat:
            return {}
        dtype = torch.float32 if flat[0].device.type == "mps" else torch.float64
        host = torch.stack([v.to(dtype) for v in flat]).tolist()  # the one host sync
        out, i = {}, 0
        for k, vs in self.values.items():
            out[k] = sum(host[i:i + len(vs)]) / len(vs)
            i += len(vs)
        return out
