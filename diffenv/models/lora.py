"""LoRA adapters on a backend's denoiser, via peft (Hu et al. 2021), saved as safetensors.

`UNet2DModel` has no `add_adapter`, so adapters are injected with `peft.inject_adapter_in_model` and
read/written with `get/set_peft_model_state_dict` (docs/design.md §8). A LoRA file carries its config in the
safetensors metadata, so `load_lora` can rebuild the adapter on a fresh base model; mismatches (wrong
base architecture, wrong rank) are errors, never silent re-initialisation.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

#: attention projections, resnet convolutions and their time projections: present in UNet2DModel,
#: UNet2DConditionModel and (attention only) the SD3/Flux transformers
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")
ADAPTER = "default"
_META_KEY = "diffusion_steer_lora"


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft adapter layers injected into `model` (empty without a LoRA)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def add_lora(model: nn.Module, rank: int = 8, alpha: float | None = None,
             target_modules: Sequence[str] | None = None, init_lora_weights: bool | str = True) -> dict:
    """Inject a LoRA adapter in place; freeze everything else. Returns the adapter config (a dict).

    With peft's default init (B = 0) the adapted model equals the base model exactly.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    if has_lora(model):
        raise ValueError("this model already has a LoRA adapter; load or reuse it instead of adding another")
    config = dict(r=rank, lora_alpha=float(alpha if alpha is not None else rank),
                  target_modules=list(target_modules or DEFAULT_TARGET_MODULES), init_lora_weights=init_lora_weights)
    inject_adapter_in_model(LoraConfig(**config), model, adapter_name=ADAPTER)
    if not has_lora(model):
        raise ValueError(f"no module of the model matches target_modules={config['target_modules']}")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return config


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base (reference) model: every LoRA layer bypassed inside the block."""
    layers = lora_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
            # enable_adapters(True) re-enables grads of the *active* adapter only, as we want


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight (W += B A · α/r), for inference at the base model's cost.

    After merging, the adapter must not be trained or saved again; returns the number of merged layers.
    """
    layers = lora_layers(model)
    for layer in layers:
        layer.merge()
    return len(layers)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def lora_file_bytes(model: nn.Module, config: dict, extra: dict | None = None) -> bytes:
    """The bytes of the safetensors file `save_lora` writes (adapter weights + config as metadata)."""
    from safetensors.torch import save

    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    return save(tensors, metadata={_META_KEY: json.dumps({"config": config, **(extra or {})}, sort_keys=True)})


def save_lora(model: nn.Module, path: str | Path, config: dict, extra: dict | None = None) -> Path:
    """Write the adapter weights + config to `path` (safetensors), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(lora_file_bytes(model, config, extra))
    os.replace(tmp, path)
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of a LoRA file written by `save_lora`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on corrupt headers
        raise ValueError(f"LoRA file {path} is not a readable safetensors file: {e}") from e
    if _META_KEY not in meta:
        raise ValueError(f"LoRA file {path} has no {_META_KEY!r} metadata; was it written by save_lora?")
    return tensors, json.loads(meta[_META_KEY])


def is_trainer_lora(path: str | Path) -> bool:
    """Whether a safetensors file is a LoRA written by `save_lora` (the trainer's `lora.safetensors`), not one in
    diffusers' format."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return _META_KEY in (f.metadata() or {})


def load_lora(model: nn.Module, path: str | Path) -> dict:
    """Inject (if needed) and fill the adapter from `path`. Returns the file's metadata."""
    tensors, meta = read_lora(path)
    if not has_lora(model):
        add_lora(model, rank=meta["config"]["r"], alpha=meta["config"]["lora_alpha"],
                 target_modules=meta["config"]["target_modules"])
    set_lora_state(model, tensors, f"LoRA file {path}")
    return meta


def set_lora_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Fill the model's adapter with `tensors` (keys and shapes of `lora_state_dict(model)`, else a
    ValueError that names `source`, e.g. "LoRA file x.safetensors")."""
    from peft import set_peft_model_state_dict

    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match this model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (different base model or target_modules?)")
    bad = [k for k in expected if expected[k].shape != tensors[k].shape]
    if bad:
        raise ValueError(f"{source} has shape {tuple(tensors[bad[0]].shape)} for {bad[0]}, "
                         f"expected {tuple(expected[bad[0]].shape)} (different rank or base model?)")
    device = next(model.parameters()).device
    set_peft_model_state_dict(model, {k: v.to(device) for k, v in tensors.items()}, adapter_name=ADAPTER)


# ------------------------------------------------------------------ diffusers-format export
#: pipeline class -> the `save_lora_weights` argument naming its denoiser ("unet" or "transformer")
DIFFUSERS_DENOISER_ARG = {"StableDiffusionPipeline": "unet", "StableDiffusionXLPipeline": "unet",
                          "StableDiffusion3Pipeline": "transformer", "FluxPipeline": "transformer"}
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def export_diffusers_lora(denoiser: nn.Module, save_directory: str | Path, pipeline_class: str | type,
                          lora_config: dict | None = None) -> Path:
    """Write `denoiser`'s adapter in diffusers' LoRA format, loadable by `pipe.load_lora_weights(dir)`.

    The peft state dict (`lora_A`/`lora_B` keys) goes through the pipeline class's own
    `save_lora_weights`, which prefixes the keys (`unet.` / `transformer.`) and stores the adapter config
    (rank, alpha, target modules) as safetensors metadata, so the loaded scale equals ours. Returns the
    written file. `pipeline_class` is a class or its name, e.g. `"StableDiffusionXLPipeline"`.
    """
    if not has_lora(denoiser):
        raise ValueError("this denoiser has no LoRA adapter to export; add or load one first")
    if lora_config is None:
        peft_config = getattr(denoiser, "peft_config", {}).get(ADAPTER)
        if peft_config is None:
            raise ValueError("cannot find the adapter's config on the model; pass lora_config=")
        lora_config = dict(r=peft_config.r, lora_alpha=peft_config.lora_alpha,
                           target_modules=sorted(peft_config.target_modules))
    return _write_diffusers_lora(lora_state_dict(denoiser), lora_config, save_directory, pipeline_class)


def convert_lora_to_diffusers(lora_file: str | Path, save_directory: str | Path, pipeline_class: str | type) -> Path:
    """Convert a `save_lora` file (e.g. a trainer's `lora.safetensors`) to diffusers' LoRA format."""
    tensors, meta = read_lora(lora_file)
    return _write_diffusers_lora(tensors, meta["config"], save_directory, pipeline_class)


def _write_diffusers_lora(tensors: dict[str, torch.Tensor], config: dict, save_directory: str | Path,
                          pipeline_class: str | type) -> Path:
    import diffusers
    from peft import LoraConfig

    name = pipeline_class if isinstance(pipeline_class, str) else pipeline_class.__name__
    if name not in DIFFUSERS_DENOISER_ARG:
        raise ValueError(f"LoRA export to {name!r} is not supported; expected one of {sorted(DIFFUSERS_DENOISER_ARG)}")
    denoiser = DIFFUSERS_DENOISER_ARG[name]
    metadata = LoraConfig(r=int(config["r"]), lora_alpha=float(config["lora_alpha"]),
                          target_modules=list(config["target_modules"])).to_dict()
    save_directory = Path(save_directory)
    getattr(diffusers, name).save_lora_weights(
        save_directory, safe_serialization=True, weight_name=DIFFUSERS_LORA_FILE,
        **{f"{denoiser}_lora_layers": {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
           f"{denoiser}_lora_adapter_metadata": metadata})
    return save_directory / DIFFUSERS_LORA_FILE


def cast_lora_parameters(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Keep the LoRA weights in `dtype` (float32) under half-precision base weights; returns how many.

    peft's LoRA layers cast their input to the adapter's dtype and the result back, so an fp32 adapter
    on an fp16/bf16 denoiser trains with fp32 optimizer states and updates (what diffusers' training
    scripts do with `cast_training_params`). Call it before building the optimizer.
    """
    params = lora_parameters(model)
    for p in params:
        p.data = p.data.to(dtype)
    return len(params)
