"""What a trainer checkpoint holds, and the checks of its fields before any is used.

The checksum (`agents.runfolder`) finds damage, not a crafted file: a file written to pass it may still hold a
negative image count, a NaN wall time or an optimizer state of the wrong shape. Every field is checked here —
type, range and shape — and a bad one is named in a ValueError, before the trainer uses any of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from agents.runfolder import non_finite
from diffenv.paths import brief

CHECKPOINT_FORMAT = 2
#: what a checkpoint holds (format 2: checksummed, with every log row so log.csv can be rebuilt)
CHECKPOINT_KEYS = ("format", "train_config", "algo_config", "world_size", "epoch", "images_seen", "nfe_total",
                   "wall_time", "lora", "optimizer", "algo_state", "rng", "log")
#: config fields that may differ on --resume (the budget can be extended, paths and display change)
RESUME_MAY_CHANGE = {"images", "out", "grid_every", "progress", "eval_images", "probe_every", "probe_images",
                     "keep_probe_loras", "eval_num_steps", "kl_samples"}
#: algorithm options that may differ on --resume: a smaller lr continues a run that stopped on NaN/inf from its last
#: good checkpoint (the optimizer's state is kept; its learning rate becomes the new one)
RESUME_MAY_CHANGE_ALGO = {"lr"}
#: each rank's generator states, saved by `Trainer._rng_state`
RNG_KEYS = ("torch", "noise_gen", "shuffle_gen", "env_gen")
#: AdamW's per-parameter state tensors, each of its parameter's shape
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def check_resumable(state: dict, path: Path, train_config: dict, algo_config, world_size: int) -> None:
    """`state` is a checkpoint of this format, finite, written with this configuration (but `RESUME_MAY_CHANGE`)
    and world size, its fields well-formed (`check_tables`, `check_fields`); else a ValueError saying which."""
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}; expected a checkpoint of DiffusionSteer's trainer "
                         f"(format {CHECKPOINT_FORMAT})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {state['format']!r}; expected {CHECKPOINT_FORMAT}")
    check_tables(state, path)
    bad = non_finite({k: state[k] for k in ("lora", "optimizer", "algo_state")})
    if bad:
        raise ValueError(f"checkpoint {path} holds NaN/inf in {', '.join(bad[:3])}; it cannot be resumed")
    saved, now = dict(state["train_config"]), dict(train_config)
    # algorithm options compare as resolved values: `--set lr=<the default>` is the same run as no --set
    algo = train_config["algo"]
    # an option added since the checkpoint was written had its default then: the behaviour of the code that wrote it
    saved.update({f"{algo}.{k}": v for k, v in {**asdict(type(algo_config)()), **state["algo_config"]}.items()})
    now.update({f"{algo}.{k}": v for k, v in asdict(algo_config).items()})
    ignore = RESUME_MAY_CHANGE | {"algo_overrides"} | {f"{algo}.{k}" for k in RESUME_MAY_CHANGE_ALGO}
    diff = {k: (saved.get(k), now[k]) for k in now if k not in ignore and saved.get(k) != now[k]}
    if diff:
        raise ValueError(f"checkpoint {path} was written with a different configuration: "
                         + ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()))
    if state["world_size"] != world_size:
        raise ValueError(f"checkpoint {path} was written by {state['world_size']} process(es), "
                         f"resuming with {world_size}")
    check_fields(state, path, algo_config.images_per_epoch)


def _fail(path: Path, field: str, value: Any, expected: str):
    raise ValueError(f"checkpoint {path}: {field}={brief(value, 80)}; expected {expected}")


def _count(path: Path, state: dict, field: str, low: int = 0) -> int:
    value = state[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(path, field, value, f"an int >= {low}")
    return value


def check_tables(state: dict, path: Path) -> None:
    """The fields that are tables are dicts (the configuration is compared first, then `check_fields`)."""
    for field in ("train_config", "algo_config", "lora", "optimizer", "algo_state"):
        if not isinstance(state[field], dict):
            _fail(path, field, type(state[field]).__name__, "a dict")


def check_fields(state: dict, path: Path, images_per_epoch: int) -> None:
    """Types and ranges of the counters, log and RNG states (what needs no model), after `check_tables`."""
    world, epoch = _count(path, state, "world_size", 1), _count(path, state, "epoch")
    if _count(path, state, "images_seen") != epoch * images_per_epoch:
        _fail(path, "images_seen", state["images_seen"], f"epoch × images_per_epoch = {epoch} × {images_per_epoch}")
    _count(path, state, "nfe_total")
    wall = state["wall_time"]
    if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not (math.isfinite(wall) and wall >= 0):
        _fail(path, "wall_time", wall, "a finite number of seconds >= 0")
    log = state["log"]
    if not isinstance(log, list) or len(log) != epoch or not all(isinstance(row, dict) for row in log):
        _fail(path, "log", f"{type(log).__name__} of {len(log) if isinstance(log, list) else '?'}",
              f"a list of {epoch} rows (one per epoch)")
    rng = state["rng"]
    if not isinstance(rng, list) or len(rng) != world:
        _fail(path, "rng", type(rng).__name__, f"a list of {world} ranks' generator states")
    for rank, gens in enumerate(rng):
        for key in RNG_KEYS:
            value = gens.get(key) if isinstance(gens, dict) else None
            if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
                _fail(path, f"rng[{rank}].{key}", value, "a generator state (a 1-d uint8 tensor)")


def check_optimizer(state: dict, path: Path, params: list[torch.Tensor]) -> None:
    """The AdamW state fits `params`: one group over all of them, moments of their shapes, a step count >= 0."""
    opt = state["optimizer"]
    groups, per_param = opt.get("param_groups"), opt.get("state")
    indices = list(range(len(params)))
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and groups[0].get("params") == indices):
        _fail(path, "optimizer.param_groups", groups, f"one group over the {len(params)} LoRA tensors")
    if not isinstance(per_param, dict) or not set(per_param) <= set(indices):
        _fail(path, "optimizer.state", per_param, f"a dict keyed by LoRA tensor indices 0..{len(params) - 1}")
    for i, entry in per_param.items():
        for name in ADAM_MOMENTS:
            value = entry.get(name) if isinstance(entry, dict) else None
            if not (isinstance(value, torch.Tensor) and value.shape == params[i].shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                _fail(path, f"optimizer.state.{i}.{name}", shape, f"a tensor of shape {tuple(params[i].shape)}")
        step = entry.get("step")
        if not (isinstance(step, torch.Tensor) and step.numel() == 1 and float(step) >= 0):
            _fail(path, f"optimizer.state.{i}.step", step, "a step count >= 0")
