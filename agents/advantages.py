"""Advantage estimates from terminal rewards (docs/design.md §7.1), shared by every algorithm."""

from __future__ import annotations

from collections import deque

import torch


def group_mean(x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """The mean of each sample's group, broadcast back to the samples: x [B, ...] -> [B, ...]."""
    return _group_mean(x, *_group_index(group_ids))


def group_centred(x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """x_i − mean_{j in group(i)} x_j for x [B, ...]; for pairs, (x¹ − x²)/2 and its negative (FDFO's ΔR and d)."""
    return x - group_mean(x, group_ids)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024; Flow-GRPO): `A_i = (R_i − mean_group) / (std_group + eps)`, [B].

    Population std (no Bessel correction). Zero-mean within every group up to the rounding of the group
    mean, divided by `std + eps`; computed in `rewards`' dtype (pass float64 rewards for the exact invariant).
    """
    groups = _group_index(group_ids)
    centred = rewards - _group_mean(rewards, *groups)
    return centred / (_group_mean(centred**2, *groups).sqrt() + eps)


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(each sample's group number [B], the number of groups); `torch.unique` is a host sync on accelerators."""
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, len(groups)


def _group_mean(x: torch.Tensor, inverse: torch.Tensor, n: int) -> torch.Tensor:
    flat = x.reshape(len(x), -1)  # [B, D]
    count = flat.new_zeros(n).index_add_(0, inverse, torch.ones_like(flat[:, 0]))
    total = flat.new_zeros(n, flat.shape[1]).index_add_(0, inverse, flat)
    return (total / count[:, None])[inverse].view_as(x)


class PerConditionStats:
    """DDPO's per-prompt reward statistics (Black et al. 2023, §4.3 / their `PerPromptStatTracker`).

    Each condition keeps its last `buffer_size` rewards; until a buffer holds `min_count` rewards the
    batch's global mean/std are used instead. `A = clip((R − mean_c) / (std_c + 1e-6), ±clip)`.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, clip: float = 5.0):
        self.buffer_size, self.min_count, self.clip = buffer_size, min_count, clip
        self.buffers: dict[int, deque] = {}

    def advantages(self, rewards: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        r, c = rewards.detach().double().cpu(), conditions.cpu()
        out = torch.empty_like(r)
        g_mean, g_std = r.mean(), r.std(unbiased=False)
        for cond in c.unique().tolist():
            sel = c == cond
            buf = self.buffers.setdefault(cond, deque(maxlen=self.buffer_size))
            buf.extend(r[sel].tolist())
            if len(buf) < self.min_count:
                mean, std = g_mean, g_std
            else:
                t = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = t.mean(), t.std(unbiased=False)
            out[sel] = (r[sel] - mean) / (std + 1e-6)
        return out.clamp(-self.clip, self.clip).to(rewards.device, rewards.dtype)

    def state_dict(self) -> dict:
        return {"buffers": {int(k): list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {int(k): deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}
