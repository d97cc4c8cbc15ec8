"""Small networks shared by the generic (non-diffusion) learners of the TorchRL and SB3 adapters."""

from __future__ import annotations

import torch
from torch import nn


class LatentEncoder(nn.Module):
    """Small CNN on a latent [B, C, H, W] + timestep [B, 1] + condition embedding → features [B, out_dim].

    `condition` may be ids [B] or one-hot floats [B, n] (how SB3 preprocesses a `Discrete` observation).
    Works for any latent size (adaptive pooling to 4×4).
    """

    def __init__(self, latent_shape, n_conditions: int, out_dim: int = 128, channels: int = 32):
        super().__init__()
        c = latent_shape[0]
        self.conv = nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.embed = nn.Embedding(n_conditions, 32)
        self.head = nn.Sequential(nn.Linear(2 * channels * 16 + 32 + 1, out_dim), nn.SiLU(),
                                  nn.Linear(out_dim, out_dim), nn.SiLU())
        self.out_dim = out_dim

    def forward(self, latent, timestep, condition):
        lead = latent.shape[:-3]
        x = self.conv(latent.reshape(-1, *latent.shape[-3:]))
        if condition.dtype.is_floating_point:  # one-hot [.., n]
            emb = condition.reshape(-1, condition.shape[-1]) @ self.embed.weight
        else:
            emb = self.embed(condition.reshape(-1).long())
        h = self.head(torch.cat([x, timestep.reshape(-1, 1).to(x.dtype), emb], -1))
        return h.reshape(*lead, -1)
