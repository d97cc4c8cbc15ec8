"""Advantage estimates from terminal rewards (docs/design.md §7.1), shared by every algorithm."""

from __future__ import annotations

from collections import deque

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024; Flow-GRPO): `A_i = (R_i − mean_group) / (std_group + eps)`, [B].

    Population std (no Bessel correction). Zero-mean within every group up to the rounding of the group
    mean, divided by `std + eps`; computed in `rewards`' dtype (pass float64 rewards for the exact invariant).
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max()) + 1
    zeros = rewards.new_zeros(n)
    count = zeros.index_add(0, inverse, torch.ones_like(rewards))
    mean = zeros.index_add(0, inverse, rewards) / count
    var = zeros.index_add(0, inverse, (rewards - mean[inverse]) ** 2) / count
    return (rewards - mean[inverse]) / (var.sqrt()[inverse] + eps)


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
