"""Tolerances that follow from floating-point arithmetic, for invariants that are exact in real numbers.

A hard-coded `atol` that happens to pass with one build of torch (and one set of rewards) breaks with
the next; these bounds hold for any inputs of the given magnitude.
"""

from __future__ import annotations

import torch


def group_means(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, ...] over each group, [G, ...] in the order of `group_ids.unique()`."""
    return torch.stack([values[group_ids == g].mean(0) for g in group_ids.unique()])


def centring_tolerance(y: torch.Tensor, x: torch.Tensor, group_ids: torch.Tensor,
                       scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Bound on |group mean of y| for `y_i = (x_i − m̂_g) / scale_i`, m̂_g = fl(mean of x over the group).

    In real numbers the group mean of y is 0 (when `scale` is constant over the group). In floating
    point, Σ_i (x_i − m̂_g) = n (m_g − m̂_g), and a sum of n terms followed by a division errs by at
    most n·u·max|x| (u = eps/2, the unit roundoff; Higham, *Accuracy and Stability of Numerical
    Algorithms*, §4.2), so the group mean of y is off by ≤ n·u·max|x| / scale. Each y_i then carries
    ≤ 3 relative roundings (subtraction, `std + eps`, division) and the test's own mean of n values
    ≤ n·u·max|y| more. With eps (= 2u) in place of u the bound has a 2× margin:

        tol_g = n·eps_x·max_g|x| / min_g scale + (n + 3)·eps_y·max_g|y|

    with eps_x, eps_y the machine epsilons of x's and y's dtypes (x in float64 when the code centres in
    float64). Returns [G, 1, …] (broadcastable against `group_means(y, group_ids)`).
    """
    scale = torch.as_tensor(scale, dtype=torch.float64).expand(len(y))
    eps_x, eps_y = torch.finfo(x.dtype).eps, torch.finfo(y.dtype).eps
    tol = []
    for g in group_ids.unique():
        sel = group_ids == g
        n = int(sel.sum())
        x_max, y_max = x[sel].abs().max().double(), y[sel].abs().max().double()
        tol.append(n * eps_x * x_max / scale[sel].min() + (n + 3) * eps_y * y_max)
    return torch.stack(tol).view(-1, *([1] * (y.dim() - 1)))
