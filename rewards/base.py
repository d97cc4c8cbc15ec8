"""What a reward is (docs/design.md §4): `images [B, C, H, W] in [0, 1], conditions [B] -> float32 [B]`.

`Reward.forward` is the boundary every reward shares: it checks the inputs, runs `score` (under
`torch.no_grad()` unless the reward is differentiable and grad is on), and checks the output. A
non-finite reward is an error, never a silent training signal, so it raises naming the reward.
Rewards see only images and conditions, never the policy that produced them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn


class Reward(nn.Module):
    """Base class: subclasses set `name`, `differentiable` and implement `score`.

    Call a reward as `reward(images, conditions)`:

    | argument | shape | meaning |
    |---|---|---|
    | `images` | `[B, C, H, W]` float | decoded images in [0, 1] (the range is not checked) |
    | `conditions` | `[B]` integer | the condition (class id / prompt index) each image was generated for |
    | returns | `[B]` float32 | one scalar reward per image, on the images' device |

    `components(images, conditions)` returns named parts of the reward; the entry under `self.name` is
    always the total (what `reward(...)` returns).
    """

    name: str = "reward"
    differentiable: bool = False

    def score(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """The reward itself: images [B, C, H, W] (checked), conditions [B] int64 -> [B]."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(images, conditions)")

    def forward(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        images, conditions = self.check_inputs(images, conditions)
        with torch.set_grad_enabled(self.grad_enabled()):
            value = self.score(images, conditions)
        return self.check_output(value, images)

    def components(self, images: torch.Tensor, conditions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named reward terms, each [B]; `self.name` maps to the total."""
        return {self.name: self(images, conditions)}

    def grad_enabled(self) -> bool:
        """Gradients flow only through differentiable rewards, and only when the caller wants them."""
        return self.differentiable and torch.is_grad_enabled()

    def check_inputs(self, images: Any, conditions: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate `images [B, C, H, W]` float and `conditions [B]` integer; conditions move to the images' device."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"reward {self.name!r}: images must be a torch.Tensor [B, C, H, W] in [0, 1], "
                f"got {type(images).__name__}"
            )
        if images.ndim != 4:
            raise ValueError(
                f"reward {self.name!r}: images must have shape [B, C, H, W] (4-D), "
                f"got {images.ndim}-D shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"reward {self.name!r}: images must be a float tensor in [0, 1], got dtype {images.dtype}")
        if not isinstance(conditions, torch.Tensor):
            conditions = torch.as_tensor(np.asarray(conditions))
        if conditions.dtype == torch.bool or conditions.is_floating_point() or conditions.is_complex():
            raise ValueError(f"reward {self.name!r}: conditions must be an integer tensor [B], got dtype {conditions.dtype}")
        batch = images.shape[0]
        if tuple(conditions.shape) != (batch,):
            raise ValueError(
                f"reward {self.name!r}: conditions must have shape [B] = ({batch},) to match images "
                f"{tuple(images.shape)}, got {tuple(conditions.shape)}"
            )
        return images, conditions.to(device=images.device, dtype=torch.long)

    def check_output(self, value: Any, images: torch.Tensor) -> torch.Tensor:
        """Coerce `value` to float32 [B] on the images' device; raise on a wrong shape or a non-finite value."""
        value = to_reward_tensor(value, name=self.name).to(device=images.device, dtype=torch.float32)
        batch = images.shape[0]
        if tuple(value.shape) != (batch,):
            raise ValueError(
                f"reward {self.name!r} returned shape {tuple(value.shape)}, expected [B] = ({batch},)"
            )
        finite = torch.isfinite(value.detach())
        if not bool(finite.all()):
            n_nan = int(torch.isnan(value.detach()).sum())
            n_bad = int((~finite).sum())
            kind = "NaN" if n_nan == n_bad else ("inf" if n_nan == 0 else "NaN/inf")
            raise ValueError(f"reward {self.name!r} returned {kind} for {n_bad} of {batch} images")
        return value

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"


def to_reward_tensor(value: Any, name: str) -> torch.Tensor:
    """Convert a reward value (tensor, numpy array, list of numbers) to a tensor; TypeError otherwise."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"reward {name!r} returned {type(value).__name__}, expected a tensor, numpy array or list of "
            f"B numbers"
        ) from err
    return torch.from_numpy(array)


class CallableReward(Reward):
    """Wrap any `fn(images, conditions) -> [B]` (tensor, numpy array or list) as a `Reward`.

    `fn` receives the checked torch tensors; its output is converted and checked like any reward's.
    If `fn` is an `nn.Module` it becomes a submodule, so `.to(device)` moves it.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], Any],
        name: str | None = None,
        differentiable: bool = False,
    ):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"CallableReward needs a callable fn(images, conditions), got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        self.differentiable = bool(differentiable)

    def score(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        return to_reward_tensor(self.fn(images, conditions), name=self.name)
