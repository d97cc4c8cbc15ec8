"""Validated keyword arguments of `DiffusionSteer-v0` (one place for every constructor check)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

ACTION_MODES = ("noise", "latent", "initial_noise", "trajectory")
ONE_STEP_MODES = ("initial_noise", "trajectory")
DEFAULT_SAMPLER = {"ddpm": "ddim", "flow": "flow_sde"}
FAMILY_SAMPLERS = {"ddpm": ("ddpm", "ddim", "ode"), "flow": ("flow_sde", "ode")}
#: default half-width b of the noise / initial-noise action box [−b, b]: finite (SB3 needs bounds) and far in
#: the Gaussian tail, P(|ε_i| > 8) = erfc(8/√2) ≈ 1.2e-15 per coordinate (the table in `diffenv.env`)
NOISE_ACTION_BOUND = 8.0


def _is_int(x: Any) -> bool:
    import numpy as np

    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass
class EnvConfig:
    """The env's arguments; see the table in `diffenv.env.DiffusionSteerEnv`."""

    model: Any = "digits-eps"
    reward: Any = "digit_classifier"
    num_steps: int = 10
    sampler: str | None = None
    eta: float = 1.0
    noise_level: float = 0.7
    action_mode: str = "noise"
    guidance_scale: float = 1.0
    conditions: Sequence[int] | None = None
    group_size: int = 1
    share_noise: bool = False
    fork_at: int | None = None
    dense_reward: bool = False
    device: Any = "cpu"
    seed: int | None = None
    action_bound: float = NOISE_ACTION_BOUND
    model_kwargs: dict | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.num_steps) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")
        if self.action_mode not in ACTION_MODES:
            raise ValueError(f"unknown action_mode {self.action_mode!r}; expected one of {ACTION_MODES}")
        for name in ("guidance_scale", "eta", "noise_level"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
            setattr(self, name, float(v))
        if not _is_int(self.group_size) or self.group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {self.group_size!r}")
        if self.fork_at is not None:
            if not _is_int(self.fork_at) or not 0 <= self.fork_at <= self.num_steps:
                raise ValueError(f"fork_at must be an int in [0, num_steps={self.num_steps}], got {self.fork_at!r}")
            if self.action_mode in ONE_STEP_MODES:
                raise ValueError(f"fork_at needs a multi-step action_mode ('noise' or 'latent'), got {self.action_mode!r}")
            self.share_noise = True  # a fork starts from one trajectory, hence one x_T
        if self.dense_reward and self.action_mode in ONE_STEP_MODES:
            raise ValueError(f"dense_reward needs a multi-step action_mode ('noise' or 'latent'), got {self.action_mode!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if self.model_kwargs is not None and not isinstance(self.model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict (e.g. {{'prompts': 'prompts.txt'}}), got {self.model_kwargs!r}")
        if not isinstance(self.action_bound, (int, float)) or not self.action_bound > 0:
            raise ValueError(f"action_bound must be a number > 0 (math.inf for none), got {self.action_bound!r}")

    def sampler_name(self, family: str) -> str:
        if self.sampler is None:
            return "ode" if self.action_mode == "initial_noise" else DEFAULT_SAMPLER[family]
        return self.sampler

    def check_against(self, backend) -> None:
        """Checks that need the model: sampler/family fit and the condition subset."""
        name = self.sampler_name(backend.family)
        allowed = FAMILY_SAMPLERS[backend.family]
        if name not in allowed:
            raise ValueError(f"unknown sampler {name!r} for the {backend.family!r} model {backend.name!r}; "
                             f"expected one of {allowed}")
        if self.action_mode == "initial_noise" and name != "ode":
            raise ValueError(f"action_mode='initial_noise' runs a deterministic sampler; expected sampler='ode' "
                             f"(or None), got {name!r}")
        self.condition_ids(backend.n_conditions)

    def condition_ids(self, n_conditions: int) -> list[int]:
        if self.conditions is None:
            return list(range(n_conditions))
        ids = list(self.conditions)
        if not ids:
            raise ValueError(f"conditions must be a non-empty subset of 0..{n_conditions - 1}, got []")
        bad = [c for c in ids if not _is_int(c) or not 0 <= c < n_conditions]
        if bad:
            raise ValueError(f"conditions {bad} out of range; expected ints in 0..{n_conditions - 1}")
        return sorted(set(int(c) for c in ids))

    def make_reward(self, device):
        if self.reward is None:
            return None
        import rewards

        return rewards.as_reward(self.reward, device=device)
