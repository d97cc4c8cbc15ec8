"""`DiffusionPolicy`: a backend's denoiser + a LoRA adapter + the env's sampler, as an RL policy.

One denoising step is the Gaussian `π_θ(x_{t−1} | x_t, c) = N(μ_θ(x_t, t, c), σ_t² I)` of the env's
own sampler (docs/design.md §3, §5), so the policy's log-prob of a transition is exactly the env sampler's.
The reference policy (for KL terms) is the same network with the adapter disabled: the frozen base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from diffenv.config import DEFAULT_SAMPLER
from diffenv.models import DiffusionBackend, load_backend
from diffenv.models.lora import (adapter_disabled, add_lora, cast_lora_parameters, load_lora, lora_file_bytes,
                                 lora_parameters, save_lora)
from diffenv.samplers import gaussian_log_prob, make_sampler


class DiffusionPolicy(nn.Module):
    """A LoRA-adapted denoiser whose per-step distribution is the env sampler's transition.

    Args:
        model: backend name or instance (its denoiser gets the adapter, in place).
        num_steps, sampler, eta, noise_level: the sampler, as in the env (None = the model's / family's default).
        guidance_scale: CFG weight used when the policy acts (1.0 = guidance-free, the point of RL here).
        lora_rank, lora_alpha, target_modules: the adapter (peft); base weights are frozen.
        lora_path: load an existing adapter instead of a fresh one (fresh = identical to the base).
    """

    def __init__(self, model: str | DiffusionBackend = "digits-eps", *, num_steps: int | None = None,
                 sampler: str | None = None, eta: float = 1.0, noise_level: float = 0.7,
                 guidance_scale: float = 1.0, lora_rank: int = 8, lora_alpha: float | None = None,
                 target_modules: Sequence[str] | None = None, lora_path: str | Path | None = None,
                 device: str | torch.device = "cpu", model_kwargs: dict | None = None):
        super().__init__()
        self.backend = load_backend(model, device=device, **(model_kwargs or {}))
        self.model_name = model if isinstance(model, str) else getattr(self.backend, "name", "custom")
        self.sampler_name = sampler or DEFAULT_SAMPLER[self.backend.family]
        num_steps = num_steps if num_steps is not None else self.backend.default_num_steps
        self.eta, self.noise_level, self.guidance_scale = float(eta), float(noise_level), float(guidance_scale)
        self.sampler = make_sampler(self.sampler_name, self.backend.scheduler_config, num_steps,
                                    family=self.backend.family, eta=eta, noise_level=noise_level,
                                    device=self.backend.device, **self.backend.sampler_kwargs(num_steps))
        self.denoiser = self.backend.denoiser  # registered so .parameters()/.to() see it
        if lora_path is not None:
            self.lora_config = load_lora(self.denoiser, lora_path)["config"]
        else:
            self.lora_config = add_lora(self.denoiser, rank=lora_rank, alpha=lora_alpha,
                                        target_modules=target_modules)
        cast_lora_parameters(self.denoiser)  # fp16/bf16 base weights: the adapter still trains in fp32

    # ------------------------------------------------------------------ the distribution
    @property
    def num_steps(self) -> int:
        return self.sampler.num_steps

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor,
                reference: bool = False, guidance_scale: float | None = None) -> torch.Tensor:
        """Network output [B, C, H, W] at any network timesteps [B] (e.g. a forward-process draw), with the
        policy's CFG weight (or `guidance_scale`: 2 NFE unless it is 1 or 0); `reference=True` uses the frozen
        base."""
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        if reference:
            with adapter_disabled(self.denoiser):
                return self.backend.predict(latents, timesteps, conditions, w)
        return self.backend.predict(latents, timesteps, conditions, w)

    def model_output(self, latents: torch.Tensor, step_index: torch.Tensor, conditions: torch.Tensor,
                     reference: bool = False, guidance_scale: float | None = None) -> torch.Tensor:
        """Network output at the sampler's step (x_t, t_k, c) [B, C, H, W]; `reference=True` uses the frozen base."""
        return self.predict(latents, self.sampler.model_timesteps[step_index], conditions, reference, guidance_scale)

    def distribution(self, latents, step_index, conditions, reference: bool = False,
                     guidance_scale: float | None = None):
        """(mean [B, C, H, W], std [B]) of π(x_{t−1} | x_t, c) at per-sample step indices."""
        out = self.model_output(latents, step_index, conditions, reference=reference, guidance_scale=guidance_scale)
        return self.sampler.step_distribution(latents, out, step_index)

    def log_prob(self, next_latents, latents, step_index, conditions) -> torch.Tensor:
        """Exact log π_θ(x_{t−1} | x_t, c), summed over latent dims: [B] (0 on deterministic steps)."""
        mean, std = self.distribution(latents, step_index, conditions)
        return gaussian_log_prob(next_latents, mean, std)

    @torch.no_grad()
    def act(self, latents, step_index, conditions, generator: torch.Generator | None = None):
        """Sample x_{t−1}; returns (next_latents, log_prob [B], mean, std)."""
        mean, std = self.distribution(latents, step_index, conditions)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        nxt = mean + std.view(-1, *([1] * (mean.dim() - 1))) * noise
        return nxt, gaussian_log_prob(nxt, mean, std), mean, std

    # ------------------------------------------------------------------ plumbing
    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that make a `DiffusionSteer-v0` env use this policy's model and sampler."""
        return dict(model=self.backend, num_steps=self.num_steps, sampler=self.sampler_name,
                    eta=self.eta, noise_level=self.noise_level, device=self.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return lora_parameters(self.denoiser)

    def save_lora(self, path: str | Path) -> Path:
        return save_lora(self.denoiser, path, self.lora_config, extra=self._lora_meta())

    def lora_file_bytes(self) -> bytes:
        """What `save_lora` writes, for callers that write the file themselves (the trainer's run folder)."""
        return lora_file_bytes(self.denoiser, self.lora_config, extra=self._lora_meta())

    def _lora_meta(self) -> dict[str, Any]:
        return {"model": self.model_name, "sampler": self.sampler_name, "num_steps": self.num_steps}

    def load_lora(self, path: str | Path) -> dict:
        meta = load_lora(self.denoiser, path)
        if meta.get("model") not in (None, self.model_name):
            raise ValueError(f"LoRA {path} was trained on model {meta['model']!r}, this policy is {self.model_name!r}")
        return meta
