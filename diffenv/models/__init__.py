"""Denoiser backends behind one interface (docs/design.md §2) and the registry that builds them by name."""

from __future__ import annotations

import difflib

import torch

from diffenv.models.base import DiffusionBackend, nfe_per_step
from diffenv.models.embedded import EMBEDDED_MODELS, EmbeddedDigitsBackend
from diffenv.models.shapes import SHAPES_MODELS, load_shapes_backend

__all__ = ["DiffusionBackend", "EmbeddedDigitsBackend", "check_model_name", "load_backend", "load_tuned_backend", "model_names",
           "nfe_per_step"]

#: spec prefixes of the diffusers text-to-image backends (`diffenv.models.diffusers_backend`)
DIFFUSERS_PREFIXES = ("sd:", "sdxl:", "sd3:", "flux:")


def model_names() -> list[str]:
    """Names `load_backend` accepts: the embedded models, and `<prefix>PATH` specs for diffusers pipelines."""
    return [*EMBEDDED_MODELS, *SHAPES_MODELS, *(f"{p}PATH" for p in DIFFUSERS_PREFIXES)]


def load_backend(model: str | DiffusionBackend, device: str | torch.device = "cpu", **backend_kwargs) -> DiffusionBackend:
    """Build a backend from a registered name or spec, or pass a `DiffusionBackend` instance through.

    | model | backend | `backend_kwargs` |
    |---|---|---|
    | `"digits-eps"`, `"digits-flow"` | `EmbeddedDigitsBackend` | none |
    | `"shapes"` (embedded `StableDiffusionPipeline`, `diffenv.models.shapes`) | `DiffusersBackend` | `torch_dtype=`, `micro_batch_size=`, ... |
    | `"sd:PATH"`, `"sdxl:PATH"`, `"sd3:PATH"`, `"flux:PATH"` (PATH: local folder or hub id) | `DiffusersBackend` | `prompts=` (required), `torch_dtype=`, `negative_prompt=`, `height=`, `width=`, ... |

    A spec may carry options after `?`, e.g. `"sd:/models/sd15?prompts=prompts.txt&torch_dtype=fp16"`.
    """
    if isinstance(model, DiffusionBackend):
        if backend_kwargs:
            raise ValueError(f"backend kwargs {sorted(backend_kwargs)} apply when building a backend by name, "
                             f"not to the {type(model).__name__} instance passed in")
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a model name or a DiffusionBackend, got {type(model).__name__}")
    if model.startswith(DIFFUSERS_PREFIXES):
        from diffenv.models.diffusers_backend import DiffusersBackend

        return DiffusersBackend.load(model, device=device, **backend_kwargs)
    if model in SHAPES_MODELS:
        return load_shapes_backend(model, device=device, **backend_kwargs)
    if model in EMBEDDED_MODELS:
        if backend_kwargs:
            raise ValueError(f"embedded model {model!r} takes no backend kwargs, got {sorted(backend_kwargs)}")
        return EmbeddedDigitsBackend(model, device=device)
    check_model_name(model)
    raise AssertionError(f"model {model!r} passed check_model_name but has no loader")


def check_model_name(model: str) -> None:
    """A name `load_backend` accepts, or a ValueError naming the closest one (before anything is loaded)."""
    if model.startswith(DIFFUSERS_PREFIXES) or model in SHAPES_MODELS or model in EMBEDDED_MODELS:
        return
    close = difflib.get_close_matches(model, model_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown model {model!r}: expected one of {model_names()}{hint}")


def load_tuned_backend(model: str, lora, device: str | torch.device = "cpu", **backend_kwargs) -> DiffusionBackend:
    """`load_backend(model)` with a LoRA file (`save_lora`, e.g. a run's `lora.safetensors`) merged into
    the denoiser's weights: the tuned model as it is deployed, sampling at the base model's cost.

    The file must have been trained on `model` (its metadata says which); the merged adapter is for
    inference only (not to be trained or saved again).
    """
    from diffenv.models.lora import load_lora, merge_lora

    backend = load_backend(model, device=device, **backend_kwargs)
    base = load_lora(backend.denoiser, lora).get("model")
    if base is not None and base != model:
        raise ValueError(f"LoRA {lora} was trained on model {base!r}, not on {model!r}")
    merge_lora(backend.denoiser)
    return backend
