"""What every algorithm shares: its config fields and its interface (the loss pieces: `agents.losses`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tensordict import TensorDict

from agents.distributed import Dist
from agents.policy import DiffusionPolicy
from diffenv.validation import bounds, validate_fields
from rewards.registry import Registry

#: name -> Algorithm class; the built-ins register themselves (`register_algorithm`), a package of your own too,
#: or through the entry-point group `diffusion_steer.algorithms` (docs/extending.md)
ALGORITHMS = Registry("algorithm")


def register_algorithm(cls: type[Algorithm], *, overwrite: bool = False) -> type[Algorithm]:
    """Class decorator: make an `Algorithm` subclass available by its `name` (`--algo NAME`, compare's `algos`)."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"register_algorithm expects an Algorithm subclass, got {cls!r}")
    return ALGORITHMS.register(cls.name, cls, overwrite=overwrite)


@dataclass
class AlgoConfig:
    """Fields every algorithm has (each algorithm's dataclass adds its own). Types come from the
    annotations and ranges from the field metadata; `diffenv.validation` checks both on construction."""

    images_per_epoch: int = field(default=64, metadata=bounds(ge=1))
    """images generated per epoch (all ranks together)"""
    group_size: int = field(default=8, metadata=bounds(ge=1))
    """sub-envs sharing a condition (GRPO groups; FDFO pairs use 2)"""
    share_noise: bool = False
    """group members also share x_T"""
    # AdamW's first step is lr / (1 - β1) = 10·lr (default β1) in float32: lr=1e38 overflowed inside torch
    lr: float = field(default=3e-4, metadata=bounds(gt=0, le=1e30))
    """AdamW learning rate of the LoRA parameters"""
    weight_decay: float = field(default=0.0, metadata=bounds(ge=0))
    """AdamW weight decay"""
    inner_epochs: int = field(default=1, metadata=bounds(ge=1))
    """passes over each epoch's training items"""
    minibatch_size: int = field(default=640, metadata=bounds(ge=1))
    """training items (transitions or samples) per optimizer step"""
    max_grad_norm: float = field(default=1.0, metadata=bounds(gt=0))
    """gradient-norm clip"""
    eta: float = field(default=1.0, metadata=bounds(ge=0))
    """DDIM η of the rollout sampler (ε-models)"""
    noise_level: float = field(default=0.7, metadata=bounds(ge=0))
    """flow-SDE `a` of the rollout sampler (flow models)"""
    train_fraction: float = field(default=1.0, metadata=bounds(gt=0, le=1))
    """share of each trajectory's visited states the update trains on, drawn at random per trajectory (1: all).
    The per-state loss is a mean over steps, so the subset's mean is an unbiased estimate of it; the update (and
    the old/reference forwards of the states) then costs this share (algorithms that train on visited states)"""

    ref_guidance_scale: float = field(default=1.0, metadata=bounds(ge=0))
    """CFG weight of the reference in the algorithm's KL / anchor term (`kl_coef`): 1 is the frozen base as it is;
    w > 1 anchors to the base *run with CFG* (a CRD-style reference: the guidance-free policy is pulled toward the
    guided base, and each reference forward costs 2 NFE). The trained policy still acts at its own guidance"""
    kl_half_life: int = field(default=0, metadata=bounds(ge=0))
    """images after which the reference term's weight has halved: `kl_coef · 2^(−images_seen / kl_half_life)`
    (a decaying anchor; 0 keeps `kl_coef` constant)"""

    def __post_init__(self) -> None:
        validate_fields(self)


class Algorithm:
    """An algorithm = `prepare` (no-grad: advantages and old-policy quantities) + `loss` (a pure
    function of a minibatch of prepared items). The trainer owns collection, optimisation, logging."""

    name: ClassVar[str]
    Config: ClassVar[type[AlgoConfig]]
    families: ClassVar[tuple[str, ...]] = ("ddpm", "flow")
    #: which visited states the update trains on: "stochastic" (per-step likelihoods: σ > 0 steps), "all", or None
    #: (forward-process draws of the final samples, no visited states: `train_fraction` does not apply)
    visited_states: ClassVar[str | None] = "stochastic"
    #: whether the loss has a reference term (`kl_coef`), to which `ref_guidance_scale` / `kl_half_life` apply
    reference_term: ClassVar[bool] = True

    def __init__(self, policy: DiffusionPolicy, cfg: AlgoConfig, dist: Dist | None = None):
        if policy.backend.family not in self.families:
            raise ValueError(f"{self.name} supports model families {self.families}, "
                             f"got {policy.backend.family!r} ({policy.model_name})")
        if cfg.train_fraction < 1 and self.visited_states is None:
            raise ValueError(f"{self.name} trains on forward-process draws of the final samples, not on visited "
                             f"states: train_fraction={cfg.train_fraction} applies to algorithms that do "
                             "(ddpo, grpo, fdfo); expected 1.0")
        if not self.reference_term and (cfg.ref_guidance_scale != 1.0 or cfg.kl_half_life):
            raise ValueError(f"{self.name} has no reference (KL / anchor) term: ref_guidance_scale="
                             f"{cfg.ref_guidance_scale} and kl_half_life={cfg.kl_half_life} apply to algorithms "
                             "with a kl_coef; expected 1.0 and 0")
        self.policy, self.cfg = policy, cfg
        self.dist = dist or Dist()
        self.images_seen = 0  # set by the trainer before each epoch (`begin_epoch`)

    def begin_epoch(self, images_seen: int) -> None:
        """Called by the trainer before each epoch's rollout with the images trained on so far (all ranks)."""
        self.images_seen = int(images_seen)

    def kl_coef_now(self) -> float:
        """The reference term's weight this epoch: `kl_coef`, halved every `kl_half_life` images when that is set."""
        if not self.cfg.kl_half_life:
            return self.cfg.kl_coef
        return self.cfg.kl_coef * 0.5 ** (self.images_seen / self.cfg.kl_half_life)

    def reference_scale(self, reference: bool) -> float | None:
        """The CFG weight of a forward: `ref_guidance_scale` for the reference, None (the policy's own) otherwise."""
        return self.cfg.ref_guidance_scale if reference else None

    def prepare(self, rollout: TensorDict) -> TensorDict:
        raise NotImplementedError

    def loss(self, items: TensorDict) -> dict[str, torch.Tensor]:
        """Already-weighted `loss_*` terms (with graph; the trainer sums them) and detached diagnostics
        (`agents.losses`)."""
        raise NotImplementedError

    def collect_context(self):
        """Context the trainer collects rollouts in (default: the current policy θ)."""
        return contextlib.nullcontext()

    def after_update(self) -> None:
        """Called after every optimizer step (e.g. an EMA old policy)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
