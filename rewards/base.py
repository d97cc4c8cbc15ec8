"""What a reward is (docs/design.md §4): `images [B, C, H, W] in [0, 1], conditions [B] -> float32 [B]`.

`Reward.forward` is the boundary every reward shares: it checks the inputs, runs `score` (under
`torch.no_grad()` unless the reward is differentiable and grad is on), and checks the output. A
non-finite reward is an error, never a silent training signal, so it raises naming the reward.
Rewards see only images and conditions, never the policy that produced them.

Checks that read values (finite outputs, condition ids in range) go through `check`: on an accelerator each
such read is a host sync, so inside `deferred_checks()` they are recorded instead and raised later with one
sync for all (`raise_failed`); the env reads its rewards' checks once per episode this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
from torch import nn


#: a check recorded inside `deferred_checks()`: (ok, message) with `ok` a 0-d bool tensor and `message()`
#: the error text (called only when `ok` is False, so it may read values)
Check = tuple[torch.Tensor, Callable[[], str]]
_DEFERRED: ContextVar[list[Check] | None] = ContextVar("rewards_deferred_checks", default=None)


@contextmanager
def deferred_checks() -> Iterator[list[Check]]:
    """`with deferred_checks() as checks:` rewards called inside record their value checks in `checks` instead
    of raising at once (no host sync); `raise_failed(checks)` raises the first failure later."""
    checks: list[Check] = []
    token = _DEFERRED.set(checks)
    try:
        yield checks
    finally:
        _DEFERRED.reset(token)


def check(ok: torch.Tensor, message: Callable[[], str]) -> None:
    """Raise `ValueError(message())` unless `ok` (a 0-d bool tensor); inside `deferred_checks()`, record it."""
    pending = _DEFERRED.get()
    if pending is not None:
        pending.append((ok, message))
    elif not bool(ok):
        raise ValueError(message())


def raise_failed(checks: list[Check]) -> None:
    """Raise `ValueError` for the first failed check of `checks`, reading all of them with one host sync."""
    if checks and not bool(torch.stack([ok.to(checks[0][0].device) for ok, _ in checks]).all()):
        for ok, message in checks:
            if not bool(ok):
                raise ValueError(message())


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

    def check_condition_ids(self, conditions: torch.Tensor, n: int, what: str) -> torch.Tensor:
        """Conditions must be `what` (e.g. "class ids") in 0..n−1 (`check`); returns them clamped into that
        range, so that under a deferred check an out-of-range id never indexes a table before it raises."""
        if conditions.numel():
            check(((conditions >= 0) & (conditions < n)).all(), lambda: (
                f"reward {self.name!r}: conditions must be {what} in 0..{n - 1}, "
                f"got values in {int(conditions.min())}..{int(conditions.max())}"))
        return conditions.clamp(0, n - 1)

    def check_output(self, value: Any, images: torch.Tensor) -> torch.Tensor:
        """Coerce `value` to float32 [B] on the images' device; raise on a wrong shape or (`check`) a
        non-finite value."""
        value = to_reward_tensor(value, name=self.name).to(device=images.device, dtype=torch.float32)
        batch = images.shape[0]
        if tuple(value.shape) != (batch,):
            raise ValueError(
                f"reward {self.name!r} returned shape {tuple(value.shape)}, expected [B] = ({batch},)"
            )
        detached = value.detach()
        check(torch.isfinite(detached).all(), lambda: self._non_finite_message(detached))
        return value

    def _non_finite_message(self, value: torch.Tensor) -> str:
        n_nan, n_bad = int(torch.isnan(value).sum()), int((~torch.isfinite(value)).sum())
        kind = "NaN" if n_nan == n_bad else ("inf" if n_nan == 0 else "NaN/inf")
        return f"reward {self.name!r} returned {kind} for {n_bad} of {len(value)} images"

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
