"""Denoiser backends behind one interface (DESIGN §2) and the registry that builds them by name."""

from __future__ import annotations

import difflib

import torch

from diffenv.models.base import DiffusionBackend, nfe_per_step
from diffenv.models.embedded import EMBEDDED_MODELS, EmbeddedDigitsBackend

__all__ = ["DiffusionBackend", "EmbeddedDigitsBackend", "load_backend", "model_names", "nfe_per_step"]


def model_names() -> list[str]:
    """Names `load_backend` accepts."""
    return list(EMBEDDED_MODELS)


def load_backend(model: str | DiffusionBackend, device: str | torch.device = "cpu") -> DiffusionBackend:
    """Build a backend from a registered name, or pass a `DiffusionBackend` instance through."""
    if isinstance(model, DiffusionBackend):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a model name or a DiffusionBackend, got {type(model).__name__}")
    if model in EMBEDDED_MODELS:
        return EmbeddedDigitsBackend(model, device=device)
    close = difflib.get_close_matches(model, model_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown model {model!r}: expected one of {model_names()}{hint}")
