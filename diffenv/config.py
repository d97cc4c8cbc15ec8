"""Validated keyword arguments of `DiffusionSteer-v0` (one place for every constructor check)."""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from diffenv.samplers import FAMILY_SAMPLERS
from diffenv.tasks import TASK_REWARD, resolve_reward
from diffenv.validation import DEVICE, SEED, bounds, checked, validate_fields

ActionMode = Literal["noise", "latent", "initial_noise", "trajectory"]
ACTION_MODES = typing.get_args(ActionMode)
ONE_STEP_MODES = ("initial_noise", "trajectory")
DEFAULT_SAMPLER = {"ddpm": "ddim", "flow": "flow_sde"}
#: default half-width b of the noise / initial-noise action box [−b, b]: finite (SB3 needs bounds) and far in
#: the Gaussian tail, P(|ε_i| > 8) = erfc(8/√2) ≈ 1.2e-15 per coordinate (the table in `diffenv.env`)
NOISE_ACTION_BOUND = 8.0


def _conditions(value):
    """A split name alone is a one-element selection: `"train"` ≡ `["train"]`."""
    if len(value) == 0:
        raise ValueError("expected a non-empty selection of condition ids or split names")
    return value


@dataclass
class EnvConfig:
    """The env's arguments; see the table in `diffenv.env.DiffusionSteerEnv`. Types and ranges are
    checked by `diffenv.validation` from the annotations and field metadata."""

    model: Any = "digits-eps"
    """a registered model name, 'sd:PATH'-style diffusers spec, or a backend object"""
    reward: Any = TASK_REWARD
    """a reward name, a {name: weight} table, a `Reward` or a callable; None: no reward (default: the model's
    task's reward, `diffenv.tasks`: digit_classifier for digits, shapes_verifier for shapes)"""
    num_steps: int | None = field(default=None, metadata=bounds(ge=1))
    """sampler steps per image (default: the model's, `backend.default_num_steps`: 10 for digits, 20 for shapes)"""
    sampler: str | None = None
    """ddim | ddpm | ode (ε-models); flow_sde | ode (flow models) (default: the model's, ddim / flow_sde)"""
    eta: float = field(default=1.0, metadata=bounds(ge=0))
    """DDIM eta (0: deterministic)"""
    noise_level: float = field(default=0.7, metadata=bounds(ge=0))
    action_mode: ActionMode = "noise"
    guidance_scale: float = field(default=1.0, metadata=bounds(ge=0))
    """CFG weight; 1 = no CFG (1 NFE/step), otherwise 2 NFE/step"""
    conditions: str | Sequence[int | str] | None = field(default=None, metadata=checked(
        _conditions, "condition ids (e.g. [3, 7]), a split name the model declares (e.g. 'train'), or None"))
    """condition ids (digit classes, prompt indices) or split names the model declares (e.g. heldout);
    (default: the model's default set, e.g. all digits)"""
    group_size: int = field(default=1, metadata=bounds(ge=1))
    share_noise: bool = False
    fork_at: int | None = field(default=None, metadata=bounds(ge=0))
    dense_reward: bool = False
    device: Any = field(default="cpu", metadata=DEVICE)
    """torch device: cpu, cuda, cuda:N, mps"""
    seed: int | None = field(default=None, metadata=SEED)
    """seed of x_T and the noise (None: a random one)"""
    action_bound: float = field(default=NOISE_ACTION_BOUND, metadata=bounds(gt=0, finite=False))
    model_kwargs: dict | None = None
    validate: bool = True
    """check actions, model outputs and rewards for NaN/inf (read once per episode); False: skip, for trusted hot loops"""

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.fork_at is not None:
            if self.num_steps is not None and self.fork_at > self.num_steps:
                raise ValueError(f"fork_at={self.fork_at!r}: expected an int in [0, num_steps={self.num_steps}]")
            if self.action_mode in ONE_STEP_MODES:
                raise ValueError(f"fork_at needs a multi-step action_mode ('noise' or 'latent'), got {self.action_mode!r}")
            self.share_noise = True  # a fork starts from one trajectory, hence one x_T
        if self.dense_reward and self.action_mode in ONE_STEP_MODES:
            raise ValueError(f"dense_reward needs a multi-step action_mode ('noise' or 'latent'), got {self.action_mode!r}")

    def sampler_name(self, family: str) -> str:
        if self.sampler is None:
            return "ode" if self.action_mode == "initial_noise" else DEFAULT_SAMPLER[family]
        return self.sampler

    def check_against(self, backend) -> None:
        """Checks that need the model: sampler/family fit and the condition subset; resolves `num_steps=None` to
        the model's default."""
        if self.num_steps is None:
            self.num_steps = int(getattr(backend, "default_num_steps", 10))
            if self.fork_at is not None and self.fork_at > self.num_steps:
                raise ValueError(f"fork_at={self.fork_at!r}: expected an int in [0, num_steps={self.num_steps}]")
        name = self.sampler_name(backend.family)
        allowed = FAMILY_SAMPLERS[backend.family]
        if name not in allowed:
            raise ValueError(f"unknown sampler {name!r} for the {backend.family!r} model {backend.name!r}; "
                             f"expected one of {allowed}")
        if self.action_mode == "initial_noise" and name != "ode":
            raise ValueError(f"action_mode='initial_noise' runs a deterministic sampler; expected sampler='ode' "
                             f"(or None), got {name!r}")
        self.condition_ids(backend)

    def condition_ids(self, backend) -> list[int]:
        """The condition set: the model's default (`backend.default_conditions`, else every id) for None, or the selected ids and the ids of selected split names
        (`backend.condition_splits`, e.g. a prompt file's `# split: heldout` sections), sorted, unique."""
        n = backend.n_conditions
        if self.conditions is None:
            default = getattr(backend, "default_conditions", None)
            return sorted(default) if default is not None else list(range(n))
        splits = getattr(backend, "condition_splits", None) or {}
        items = [self.conditions] if isinstance(self.conditions, str) else list(self.conditions)
        expected = f"ids in 0..{n - 1}" + (f" or split names {sorted(splits)}" if splits else
                                            f" (model {getattr(backend, 'name', '?')!r} declares no split names)")
        unknown = [c for c in items if isinstance(c, str) and c not in splits]
        bad = [c for c in items if not isinstance(c, str) and not 0 <= c < n]
        if unknown or bad:
            what = [f"{bad} out of range"] * bool(bad) + [f"unknown split name(s) {unknown}"] * bool(unknown)
            raise ValueError(f"conditions {'; '.join(what)}; expected {expected}")
        ids = [i for c in items for i in (splits[c] if isinstance(c, str) else [c])]
        return sorted(set(int(c) for c in ids))

    def make_reward(self, device, backend=None):
        """The reward function (None: no reward); the default names the task of `backend` (else of `model`)."""
        reward = resolve_reward(self.reward, self.model if backend is None else backend)
        if reward is None:
            return None
        import rewards

        return rewards.as_reward(reward, device=device)
