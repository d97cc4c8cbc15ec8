"""The one interface every denoiser backend implements (docs/design.md §2).

A backend owns a frozen network, knows what it predicts and on which noise schedule, and turns
latents into images. Conditions are always integer ids into the backend's condition set (class ids
for the digits models, prompt indices for text-to-image pipelines); id `n_conditions` is the null
condition used for classifier-free guidance.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

#: model families and what their networks predict
FAMILIES = {"ddpm": ("epsilon", "v_prediction", "sample"), "flow": ("flow",)}


def nfe_per_step(guidance_scale: float) -> int:
    """Network evaluations per denoising step (diffusers convention: 1.0 means no CFG).

    `guidance_scale == 1` runs the conditional branch only and `== 0` the unconditional branch only;
    any other value needs both (one batched call of twice the batch, counted as 2 NFE).
    """
    return 1 if guidance_scale in (0.0, 1.0) else 2


class DiffusionBackend(abc.ABC):
    """A frozen conditional denoiser plus its schedule and decoder.

    Attributes subclasses set:
        family: ``"ddpm"`` (discrete-time ε/v/x0 prediction) or ``"flow"`` (rectified-flow velocity).
        prediction_type: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow"``.
        latent_shape: ``(C, H, W)`` of the diffusion state.
        condition_names: one human-readable name per condition id.
        default_conditions: the ids sampled by default (e.g. the `shapes` model's train split; None = all).
        default_num_steps: the model's default number of sampler steps.
        condition_splits: named subsets of condition ids (e.g. a prompt file's `train` / `heldout`);
            `conditions="heldout"` selects one. Digits models declare none.
        scheduler_config: the diffusers scheduler config (a dict) the samplers read tables from.
        num_train_timesteps: T of the training schedule; the env reports ``t / T``.
    """

    family: str
    prediction_type: str
    latent_shape: tuple[int, int, int]
    condition_names: list[str]
    condition_splits: dict[str, list[int]] = {}  # read-only default; backends assign their own
    default_conditions: list[int] | None = None  # the ids the env samples when `conditions=None` (None: all)
    default_num_steps: int = 10  # sampler steps when the env's `num_steps` is not given
    text_conditioned: bool = False  # conditions are prompts (samples are saved with them)
    scheduler_config: dict[str, Any]
    num_train_timesteps: int = 1000
    name: str = "backend"

    @property
    def n_conditions(self) -> int:
        return len(self.condition_names)

    @property
    def null_condition(self) -> int:
        """The condition id of the unconditional (dropped-label / empty-prompt) branch."""
        return self.n_conditions

    @property
    @abc.abstractmethod
    def denoiser(self) -> nn.Module:
        """The network that LoRA adapters attach to."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @abc.abstractmethod
    def forward_model(self, latents: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """One raw network call.

        latents [B, C, H, W]; timesteps [B] on the training scale (0..T); conditions [B] int64 in
        ``0..n_conditions`` (``n_conditions`` = null). Returns the model output [B, C, H, W] in float32.
        """

    def sampler_kwargs(self, num_steps: int) -> dict[str, Any]:
        """Extra `make_sampler` arguments the model's own pipeline uses (e.g. Flux's sigma grid)."""
        return {}

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, H, W] -> images [B, C', H', W'] in [0, 1]."""

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditions: torch.Tensor,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Model output with classifier-free guidance: ``u + w (c − u)``, both branches in one call."""
        if guidance_scale == 1.0:
            return self.forward_model(latents, timesteps, conditions)
        null = torch.full_like(conditions, self.null_condition)
        if guidance_scale == 0.0:
            return self.forward_model(latents, timesteps, null)
        both = self.forward_model(
            torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), torch.cat([conditions, null])
        )
        cond_out, uncond_out = both.chunk(2)
        return uncond_out + guidance_scale * (cond_out - uncond_out)
