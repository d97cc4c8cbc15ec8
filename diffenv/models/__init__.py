"""Denoiser backends behind one interface (docs/design.md §2) and the registry that builds them by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch

from diffenv.models.base import DiffusionBackend, nfe_per_step
from diffenv.models.embedded import EMBEDDED_MODELS, EmbeddedDigitsBackend
from diffenv.models.shapes import SHAPES_MODELS, load_shapes_backend
from rewards.registry import Registry

__all__ = ["MODELS", "DiffusionBackend", "EmbeddedDigitsBackend", "check_model_name", "load_backend",
           "load_tuned_backend", "model_names", "nfe_per_step", "register_model"]

#: spec prefixes of the diffusers text-to-image backends (`diffenv.models.diffusers_backend`)
DIFFUSERS_PREFIXES = ("sd:", "sdxl:", "sd3:", "flux:")


#: name -> loader(name, device, **backend_kwargs) -> DiffusionBackend. A key ending in ":" is a prefix: it loads
#: every spec "PREFIX:PATH" (the diffusers pipelines). Register your own with `register_model` or through the
#: entry-point group `diffusion_steer.models` (docs/extending.md).
MODELS = Registry("model")


def register_model(name: str, loader: Callable[..., DiffusionBackend] | None = None, *, overwrite: bool = False):
    """Make `loader(name, device=..., **backend_kwargs) -> DiffusionBackend` load the model `name` (or every
    `name` + PATH spec, when `name` ends with ":"); a decorator when `loader` is omitted."""
    return MODELS.register(name, loader, overwrite=overwrite)


def _load_embedded(name: str, device="cpu", **backend_kwargs) -> DiffusionBackend:
    if backend_kwargs:
        raise ValueError(f"embedded model {name!r} takes no backend kwargs, got {sorted(backend_kwargs)}")
    return EmbeddedDigitsBackend(name, device=device)


def _load_diffusers(spec: str, device="cpu", **backend_kwargs) -> DiffusionBackend:
    from diffenv.models.diffusers_backend import DiffusersBackend

    return DiffusersBackend.load(spec, device=device, **backend_kwargs)


for _name in EMBEDDED_MODELS:
    register_model(_name, _load_embedded)
for _name in SHAPES_MODELS:
    register_model(_name, load_shapes_backend)
for _prefix in DIFFUSERS_PREFIXES:
    register_model(_prefix, _load_diffusers)


def model_names() -> list[str]:
    """Names `load_backend` accepts: the registered models, and `<prefix>PATH` for each registered prefix."""
    names = MODELS.names()
    return [n for n in names if not n.endswith(":")] + [f"{n}PATH" for n in names if n.endswith(":")]


def _loader_key(model: str) -> str | None:
    if not model.endswith(":") and model in MODELS:
        return model
    head, sep, _ = model.partition(":")
    return head + sep if sep and head + sep in MODELS else None


def load_backend(model: str | DiffusionBackend, device: str | torch.device = "cpu", **backend_kwargs) -> DiffusionBackend:
    """Build a backend from a registered name or spec, or pass a `DiffusionBackend` instance through.

    | model | backend | `backend_kwargs` |
    |---|---|---|
    | `"digits-eps"`, `"digits-flow"` | `EmbeddedDigitsBackend` | none |
    | `"shapes"` (embedded `StableDiffusionPipeline`, `diffenv.models.shapes`) | `DiffusersBackend` | `torch_dtype=`, `micro_batch_size=`, ... |
    | `"sd:PATH"`, `"sdxl:PATH"`, `"sd3:PATH"`, `"flux:PATH"` (PATH: local folder or hub id) | `DiffusersBackend` | `prompts=` (required), `torch_dtype=`, `negative_prompt=`, `height=`, `width=`, ... |
    | a name of your own (`register_model`) | your loader's | your loader's |

    A spec may carry options after `?`, e.g. `"sd:/models/sd15?prompts=prompts.txt&torch_dtype=fp16"`.
    """
    if isinstance(model, DiffusionBackend):
        if backend_kwargs:
            raise ValueError(f"backend kwargs {sorted(backend_kwargs)} apply when building a backend by name, "
                             f"not to the {type(model).__name__} instance passed in")
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a model name or a DiffusionBackend, got {type(model).__name__}")
    check_model_name(model)
    return MODELS.get(_loader_key(model))(model, device=device, **backend_kwargs)


def check_model_name(model: str) -> None:
    """A name `load_backend` accepts, or a ValueError naming the closest one (before anything is loaded)."""
    if _loader_key(model) is not None:
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
