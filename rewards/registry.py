"""One registry pattern for every extension point: rewards, models, algorithms and tasks (docs/extending.md).

`Registry` is a name -> object mapping with a `register` decorator and a Python entry-point group, so a package
of your own adds a reward, model, algorithm or task either by calling `register` when it is imported, or, without
being imported by anyone, by declaring the object in its `pyproject.toml`:

    [project.entry-points."diffusion_steer.rewards"]
    my_reward = "my_package.rewards:my_reward_factory"

Entry points are read the first time a registry is asked for a name it lacks, or for its names. `rewards` is the
package every other one imports (it imports none of them), so the pattern lives here; `diffenv.models`,
`agents.algos` and `diffenv.tasks` build their registries from it.

This module also holds the reward registry itself: `register` a factory, `make` an instance, `factory` to inspect
one (`rewards.as_reward`, in `rewards.combine`, turns anything reward-like into a `Reward`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any

import torch

from rewards.base import CallableReward, Reward

#: the entry-point group of each registry: `ENTRY_POINT_PREFIX + kind + "s"`
ENTRY_POINT_PREFIX = "diffusion_steer."


class Registry:
    """name -> registered object, for one kind of extension (`kind`: "reward", "model", "algorithm", "task").

    `register(name)` is a decorator (or `register(name, obj)` a call); a taken name raises unless
    `overwrite=True`, so two packages cannot silently shadow each other. `get(name)` names the closest known
    name when it fails. Entry points of the group `diffusion_steer.<kind>s` are loaded once, on the first miss.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self.group = f"{ENTRY_POINT_PREFIX}{kind}s"
        self._items: dict[str, Any] = {}
        self._entry_points_loaded = False

    def register(self, name: str, obj: Any = None, *, overwrite: bool = False):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def add(value: Any) -> Any:
            if name in self._items and not overwrite and self._items[name] is not value:
                raise ValueError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
            self._items[name] = value
            return value

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def load_entry_points(self) -> None:
        """Import every installed package's entry points of this group (once); an entry point that imports without
        registering itself is registered under its entry-point name."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            obj = ep.load()
            if ep.name not in self._items:
                self.register(ep.name, obj)

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            self.load_entry_points()
        return name in self._items

    def get(self, name: str) -> Any:
        if name not in self:
            raise ValueError(self.unknown(name))
        return self._items[name]

    __getitem__ = get

    def names(self) -> list[str]:
        self.load_entry_points()
        return sorted(self._items)

    def items(self) -> list[tuple[str, Any]]:
        return [(n, self._items[n]) for n in self.names()]

    def values(self) -> list[Any]:
        return [v for _, v in self.items()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def unknown(self, name: object) -> str:
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Registered {self.kind}s: {', '.join(known)}"


#: name -> factory(**kwargs) returning a Reward (or a plain callable, which `make` wraps)
REWARDS = Registry("reward")


def register(name: str, *, overwrite: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering `factory(**kwargs) -> Reward` under `name` (`REWARDS.register`)."""
    return REWARDS.register(name, overwrite=overwrite)


def names() -> list[str]:
    """The registered reward names, sorted."""
    return REWARDS.names()


def factory(name: str) -> Callable[..., Any]:
    """The factory registered as `name` (e.g. to read its signature), or ValueError naming the known rewards."""
    return REWARDS.get(name)


def make(name: str, device: str | torch.device = "cpu", **kwargs: Any) -> Reward:
    """Build the reward registered as `name` with `kwargs` and move it to `device`."""
    reward = factory(name)(**kwargs)
    if not isinstance(reward, Reward):
        reward = CallableReward(reward, name=name)
    return reward.to(device)
