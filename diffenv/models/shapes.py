"""The embedded `shapes` model: a real `StableDiffusionPipeline` (32×32, VAE + CLIP text encoder + cross-attention
UNet) trained in this repo on the shapes task (`rewards.shapes_task`, `python -m retrain.train_shapes`).

`load_backend("shapes")` is the packaged pipeline folder behind the ordinary `sd:` backend: the condition set is
the folder's `prompts.txt` (the 1,155 training prompts, then the 276 held-out ones, as the `train` and
`heldout` splits, plus `eval`: the 50 prompts of `shapes_task.eval_prompts()` over every kind and both splits),
the env samples the `train` split unless `conditions` says otherwise, and the default is
20 DDIM steps. The same folder loads in plain diffusers: `StableDiffusionPipeline.from_pretrained(SHAPES_DIR)`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffenv.models.embedded import WEIGHTS_DIR
from rewards.shapes_task import eval_prompts

SHAPES_DIR = WEIGHTS_DIR / "shapes"
SHAPES_MODELS = ("shapes",)
DEFAULT_NUM_STEPS = 20


def load_shapes_backend(name: str = "shapes", device: str | torch.device = "cpu", path: str | Path | None = None,
                        **backend_kwargs):
    """The `shapes` pipeline as a `DiffusersBackend` (`backend_kwargs`: e.g. `micro_batch_size`, `torch_dtype`)."""
    from diffenv.models.diffusers_backend import DiffusersBackend

    folder = Path(path) if path is not None else SHAPES_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"embedded model {name!r}: {folder / 'model_index.json'} is missing; train it with "
                                f"`python -m retrain.train_shapes`")
    if "prompts" in backend_kwargs:
        raise ValueError(f"model {name!r} has a fixed prompt set ({folder / 'prompts.txt'}); select prompts with "
                         f"conditions= (ids or the split names 'train' / 'heldout'), or load 'sd:{folder}' with "
                         f"your own prompts")
    backend = DiffusersBackend.load(f"sd:{folder}", prompts=folder / "prompts.txt", device=device, **backend_kwargs)
    backend.name = name
    index = {p: i for i, p in enumerate(backend.condition_names)}
    backend.condition_splits = {**backend.condition_splits, "eval": [index[p] for p in eval_prompts()]}
    backend.default_conditions = list(backend.condition_splits["train"])
    backend.default_num_steps = DEFAULT_NUM_STEPS
    return backend
