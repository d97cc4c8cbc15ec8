"""The env's validation, recorded on the device while episodes run and read once at their end (docs/design.md §1).

Reading whether a tensor is finite is a host sync: on an accelerator the host waits for the device's queue to
drain. So during an episode the env only records what it would check (a few elementwise ops per step, no
sync), and `raise_inputs` / `raise_rewards` read the records (one sync each) at the episode's last step, or
whenever the env's general path or `DiffusionSteerVectorEnv.check` asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from rewards.base import Check, raise_failed


def check_action_kind(actions: Any, key: str) -> None:
    """Actions that hold floating-point values: a tensor with data (not on the meta device) or a numeric numpy
    array; else TypeError/ValueError naming `key` (`action`, `actions`), before any conversion raises its own."""
    if isinstance(actions, torch.Tensor):
        if actions.device.type == "meta":
            raise ValueError(f"{key}: a tensor on the meta device (a shape without values); expected a tensor with "
                             "values (on the CPU or the env's device)")
        dtype = actions.dtype
    elif isinstance(actions, np.ndarray):
        dtype = actions.dtype
    else:
        return
    if not (dtype.is_floating_point if isinstance(dtype, torch.dtype) else np.issubdtype(dtype, np.floating)):
        raise TypeError(f"{key}: dtype {dtype}; expected floating point values")


class EpisodeChecks:
    """Per sub-env: the first step with a non-finite action, the first step with a NaN/inf model output and the
    latent that network call saw (for the diagnosis); plus the rewards' own deferred checks."""

    def __init__(self, n: int, latent_shape: tuple[int, ...], device: torch.device):
        self.action_step = torch.full((n,), -1, dtype=torch.long, device=device)  # [N]; −1: none
        self.output_step = torch.full((n,), -1, dtype=torch.long, device=device)  # [N]; −1: none
        self.output_input = torch.zeros((n, *latent_shape), device=device)  # [N, C, H, W]
        self.rewards: list[Check] = []  # `rewards.base.deferred_checks` records, in call order

    def clear(self, rows: torch.Tensor | None = None) -> None:
        """Forget the records of `rows` [N] bool (None: all): their episodes start over."""
        if rows is None:
            self.action_step = torch.full_like(self.action_step, -1)
            self.output_step = torch.full_like(self.output_step, -1)
            self.rewards = []
        else:
            self.action_step = self.action_step.masked_fill(rows, -1)
            self.output_step = self.output_step.masked_fill(rows, -1)

    def record_actions(self, finite: torch.Tensor, step_index: torch.Tensor) -> None:
        """`finite` [N] bool: whether each row's action is finite at its step `step_index` [N]."""
        first = ~finite & (self.action_step < 0)
        self.action_step = torch.where(first, step_index, self.action_step)

    def record_output(self, out: torch.Tensor, latents: torch.Tensor, step_index: torch.Tensor) -> None:
        """The network output `out` [N, C, H, W] at `latents` (its input) and `step_index` [N]."""
        first = ~torch.isfinite(out).flatten(1).all(1) & (self.output_step < 0)
        self.output_step = torch.where(first, step_index, self.output_step)
        self.output_input = torch.where(first.view(-1, 1, 1, 1), latents, self.output_input)

    def raise_inputs(self, diagnose_output: Callable[[torch.Tensor, torch.Tensor], str]) -> None:
        """Raise `ValueError` for a recorded non-finite action, else for a NaN/inf model output, whose message is
        `diagnose_output(output_step, output_input)`. One host sync; the records are cleared (reported once)."""
        if not bool(((self.action_step >= 0) | (self.output_step >= 0)).any()):
            return
        action_step, output_step, inputs = self.action_step, self.output_step, self.output_input
        self.clear()
        if bool((action_step >= 0).any()):  # the cause first: a NaN action makes the next model output NaN
            rows = (action_step >= 0).nonzero().flatten()
            raise ValueError(non_finite_actions(rows.tolist(), int(action_step[rows].min())))
        raise ValueError(diagnose_output(output_step, inputs))

    def raise_rewards(self) -> None:
        """Raise `ValueError` for the first failed reward check (one host sync); the records are cleared."""
        pending, self.rewards = self.rewards, []
        raise_failed(pending)


def non_finite_actions(rows: list[int], step: int | None = None) -> str:
    """The error for non-finite actions of sub-envs `rows`; `step`: the first such step, for a deferred check."""
    later = "" if step is None else (
        f" (first at step {step}; tensor actions are checked at the episode's end, see the `validate` argument)")
    return f"actions contain NaN or inf (sub-envs {rows}); expected finite values{later}"
