"""The prediction-type algebra and the forward (noising) process a model was trained with (docs/design.md §3).

One place converts a network output to x̂0 and ε̂, and (x0, ε) back to the output a network was trained to
predict: the samplers (`diffenv.samplers`) use it at their step tables, the forward-process algorithms
(FPO, DiffusionNFT, FDFO) at arbitrary noise levels. With `x_t = α x0 + σ ε`:

| `prediction_type` | output | x̂0 | ε̂ |
|---|---|---|---|
| `epsilon` (Ho et al. 2020, eq. 15) | ε | (x_t − σ ε̂) / α | output |
| `v_prediction` (Salimans & Ho 2022; α² + σ² = 1) | α ε − σ x0 | α x_t − σ v | α v + σ x_t |
| `sample` | x0 | output | (x_t − α x̂0) / σ |
| `flow` (rectified flow; α = 1 − t, σ = t) | ε − x0 | x_t − σ v | x_t + α v |
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")


def predicted_x0(prediction_type: str, latents: Tensor, output: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x̂0 implied by the network output at x_t = α x0 + σ ε (α, σ broadcastable to the latents), unclipped."""
    if prediction_type == "epsilon":
        return (latents - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * latents - sigma * output
    if prediction_type == "sample":
        return output
    _check(prediction_type)
    return latents - sigma * output  # flow


def predicted_noise(prediction_type: str, latents: Tensor, output: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """ε̂ implied by the network output (from the unclipped x̂0, as diffusers' `use_clipped_model_output=False`)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha * output + sigma * latents
    if prediction_type == "sample":
        return (latents - alpha * output) / sigma
    _check(prediction_type)
    return latents + alpha * output  # flow


def training_target(prediction_type: str, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The output a network of this prediction type regresses on for x_t = α x0 + σ ε (its training target)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha * noise - sigma * x0
    if prediction_type == "sample":
        return x0
    _check(prediction_type)
    return noise - x0  # flow


def x0_sign(prediction_type: str) -> float:
    """Sign of ∂x̂0/∂output: +1 for x0 prediction, −1 for ε, v and flow prediction."""
    _check(prediction_type)
    return 1.0 if prediction_type == "sample" else -1.0


class ForwardProcess:
    """The forward (noising) process a model was trained with, indexed by u ∈ [0, 1) (0 = data).

    | family | noising at u                           | network timestep | target (output space)               |
    |--------|----------------------------------------|------------------|-------------------------------------|
    | flow   | x_t = (1 − t) x0 + t ε, t = u          | T · t            | ε − x0                              |
    | ddpm   | x_τ = √ᾱ_τ x0 + √(1−ᾱ_τ) ε, τ = ⌊u T⌋  | τ                | ε; √ᾱ ε − √(1−ᾱ) x0 (v-pred); x0    |

    These are the distributions the models were trained on (`retrain.train_digits`). Pure maths: the
    network call at these timesteps is the policy's (`agents.policy.DiffusionPolicy.predict`).
    """

    def __init__(self, family: str, prediction_type: str, num_train_timesteps: int,
                 alphas_cumprod: Tensor | None = None, device: str | torch.device = "cpu"):
        _check(prediction_type)
        if (family == "flow") != (prediction_type == "flow"):
            raise ValueError(f"prediction_type {prediction_type!r} does not fit family {family!r}")
        if family == "ddpm" and alphas_cumprod is None:
            raise ValueError("a ddpm-family forward process needs its alphas_cumprod [T]")
        self.family, self.prediction_type = family, prediction_type
        self.num_train_timesteps = int(num_train_timesteps)
        self.device = torch.device(device)
        self.alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod.double().to(self.device)  # [T]
        self.x0_sign = x0_sign(prediction_type)

    @classmethod
    def of(cls, backend) -> "ForwardProcess":
        """The forward process of a `diffenv.models.DiffusionBackend`, on its device."""
        alphas = None
        if backend.family == "ddpm":
            from diffusers import DDPMScheduler

            alphas = DDPMScheduler.from_config(backend.scheduler_config).alphas_cumprod
        return cls(backend.family, backend.prediction_type, backend.num_train_timesteps, alphas, backend.device)

    def draw(self, n: int, shape, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """u [n] ~ U(0, 1) and ε [n, *shape] ~ N(0, I) from `generator`."""
        u = torch.rand(n, generator=generator, device=self.device)
        return u, torch.randn((n, *shape), generator=generator, device=self.device)

    def coefficients(self, u: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(α, σ) [n, 1, ...] in `like`'s layout, and the network timesteps [n]."""
        view = (-1, *([1] * (like.dim() - 1)))
        if self.family == "flow":
            return (1 - u).view(view), u.view(view), u * self.num_train_timesteps
        tau = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        abar = self.alphas_cumprod[tau].to(like.dtype)
        return abar.sqrt().view(view), (1 - abar).sqrt().view(view), tau.to(like.dtype)

    def noise(self, x0: Tensor, u: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """(x_u [n, C, H, W], network timesteps [n])."""
        a, s, timesteps = self.coefficients(u, x0)
        return a * x0 + s * eps, timesteps

    def target(self, x0: Tensor, u: Tensor, eps: Tensor) -> Tensor:
        """The regression target in the model's output space (what its training loss regressed on)."""
        a, s, _ = self.coefficients(u, x0)
        return training_target(self.prediction_type, x0, eps, a, s)

    def pred_x0(self, output: Tensor, x_t: Tensor, u: Tensor) -> Tensor:
        """x̂0 implied by the model output at (x_u, u), unclipped."""
        a, s, _ = self.coefficients(u, x_t)
        return predicted_x0(self.prediction_type, x_t, output, a, s)
