"""Diffusion-RL algorithms, one file each, all on the rollout format of `agents.rollout`.

An algorithm file imports only shared modules (`agents.algos.base`, `agents.losses`, `agents.advantages`,
`agents.rollout`, `diffenv`), never another algorithm."""

from __future__ import annotations

import dataclasses
from typing import Any

from agents.algos.awm import AWM, AWMConfig
from agents.algos.base import ALGORITHMS, AlgoConfig, Algorithm, register_algorithm
from agents.algos.ddpo import DDPO, DDPOConfig
from agents.algos.dgpo import DGPO, DGPOConfig
from agents.algos.fdfo import FDFO, FDFOConfig
from agents.algos.fpo import FPO, FPOConfig
from agents.algos.grpo import GRPO, GRPOConfig
from agents.algos.nft import DiffusionNFT, NFTConfig

# the built-ins registered themselves (`@register_algorithm`) when imported above


def make_algorithm_config(algo: str, overrides: dict[str, Any] | None = None) -> AlgoConfig:
    """The algorithm's config dataclass with `overrides` applied; unknown fields are an error."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algo {algo!r}; expected one of {sorted(ALGORITHMS)}")
    cls = ALGORITHMS[algo].Config
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides or {}) - names)
    if bad:
        raise ValueError(f"unknown {algo} option(s) {bad}; expected some of {sorted(names)}")
    try:
        return cls(**(overrides or {}))  # types and ranges: `diffenv.validation`, from the field metadata
    except (TypeError, ValueError) as e:
        raise type(e)(f"{algo} option {e}") from None


__all__ = ["ALGORITHMS", "AlgoConfig", "Algorithm", "make_algorithm_config", "register_algorithm",
           "DDPO", "DDPOConfig", "GRPO", "GRPOConfig", "FPO", "FPOConfig", "DiffusionNFT", "NFTConfig",
           "FDFO", "FDFOConfig", "AWM", "AWMConfig", "DGPO", "DGPOConfig"]
