"""Small MLP reward heads on frozen features, saved as safetensors + a JSON config (no pickle).

The layout reproduces the LAION aesthetic predictor v2 (`improved-aesthetic-predictor`): an
`nn.Sequential` named `layers` of Linear / Dropout modules, so its converted weights (keys
`layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7`) load unchanged::

    LAION_AESTHETIC = {"in_dim": 768, "hidden": [1024, 128, 64, 16], "dropout": [0.2, 0.2, 0.1, 0.0],
                       "activation": "none"}

(the LAION head has no nonlinearity between its layers; our ratings heads use `"gelu"`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

ACTIVATIONS = {"none": None, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
LAION_AESTHETIC = {"in_dim": 768, "hidden": [1024, 128, 64, 16], "dropout": [0.2, 0.2, 0.1, 0.0], "activation": "none"}


class MLPHead(nn.Module):
    """features [B, in_dim] -> scores [B]; `hidden=[]` is a linear head (e.g. ridge regression)."""

    def __init__(self, in_dim: int, hidden=(), dropout=(), activation: str = "none"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.config = {"in_dim": int(in_dim), "hidden": [int(h) for h in hidden],
                       "dropout": [float(p) for p in dropout], "activation": activation}
        modules: list[nn.Module] = []
        width = int(in_dim)
        for i, h in enumerate(self.config["hidden"]):
            modules.append(nn.Linear(width, h))
            if ACTIVATIONS[activation] is not None:
                modules.append(ACTIVATIONS[activation]())
            p = self.config["dropout"][i] if i < len(self.config["dropout"]) else 0.0
            if p > 0:
                modules.append(nn.Dropout(p))
            width = h
        modules.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*modules)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)


def config_path(path: str | os.PathLike) -> Path:
    """The JSON config beside a head's safetensors file: `head.safetensors` -> `head.json`."""
    return Path(path).with_suffix(".json")


def save_head(head: MLPHead, path: str | os.PathLike, extra_tensors: dict | None = None,
              extra_config: dict | None = None) -> Path:
    """Write `path` (.safetensors: the head's weights + `extra_tensors`) and its JSON config, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    config_path(path).write_text(json.dumps({"head": head.config, **(extra_config or {})}, indent=2, sort_keys=True))
    return path


def load_head(path: str | os.PathLike, expected_in_dim: int | None = None) -> tuple[MLPHead, dict, dict]:
    """(head, extra tensors, config) from `save_head`'s files, or a bare LAION-layout safetensors file.

    A file without a JSON config must hold exactly the LAION v2 keys (`layers.{0,2,4,6,7}.*`).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward head {str(path)!r} does not exist; expected a .safetensors file")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on bad headers
        raise ValueError(f"reward head {path} is not a readable safetensors file: {e}") from e
    cfg_file = config_path(path)
    if cfg_file.is_file():
        config = json.loads(cfg_file.read_text())
        head_cfg = config["head"]
        weights = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
        extra = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    else:
        config, head_cfg, weights, extra = {}, dict(LAION_AESTHETIC), tensors, {}
        head_cfg["in_dim"] = int(tensors["layers.0.weight"].shape[1]) if "layers.0.weight" in tensors else -1
    if expected_in_dim is not None and head_cfg["in_dim"] != expected_in_dim:
        raise ValueError(f"reward head {path} expects {head_cfg['in_dim']}-dim features, but the feature model "
                         f"gives {expected_in_dim}-dim ones (a head trained for another CLIP?)")
    head = MLPHead(**head_cfg)
    try:
        missing, unexpected = head.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"reward head {path} does not match its architecture: {e}") from e
    if missing or unexpected:
        hint = "" if cfg_file.is_file() else f" (no {cfg_file.name} beside it, so the LAION v2 layout was assumed)"
        raise ValueError(f"reward head {path} does not match its architecture{hint}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return head.eval(), extra, config
