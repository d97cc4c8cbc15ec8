"""Rewards by name: `register` a factory, `make` an instance, `factory` to inspect one (`rewards.as_reward`,
in `rewards.combine`, turns anything reward-like into a `Reward`)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch

from rewards.base import CallableReward, Reward

#: name -> factory(**kwargs) returning a Reward (or a plain callable, which `make` wraps)
_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str, *, overwrite: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering `factory(**kwargs) -> Reward` under `name`.

    Re-registering a taken name raises unless `overwrite=True`, so two modules cannot silently
    shadow each other.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
            raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = factory
        return factory

    return decorator


def names() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def factory(name: str) -> Callable[..., Any]:
    """The factory registered as `name` (e.g. to read its signature), or ValueError naming the known rewards."""
    if name not in _REGISTRY:
        raise ValueError(_unknown_name_message(name))
    return _REGISTRY[name]


def make(name: str, device: str | torch.device = "cpu", **kwargs: Any) -> Reward:
    """Build the reward registered as `name` with `kwargs` and move it to `device`."""
    reward = factory(name)(**kwargs)
    if not isinstance(reward, Reward):
        reward = CallableReward(reward, name=name)
    return reward.to(device)


def _unknown_name_message(name: str) -> str:
    known = names()
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown reward {name!r}.{hint} Registered rewards: {', '.join(known)}"
