"""Learning curves on the validation probe set (docs/design.md §6): images to reach a target, a mean with a
95 % confidence interval over seeds, and the rule that picks a run's reported checkpoint.

A curve is a list of `CurvePoint`s — one per probe of a run: images generated so far, the probe judge score
(higher is better) and the probe diversity (lower or higher is better, by the task's `TaskProtocol`). These
functions are pure and see only validation points: the test (eval) set never enters a selection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CurvePoint:
    images: float
    """images generated when the checkpoint was probed"""
    score: float
    """probe judge score (higher is better), e.g. judge accuracy"""
    diversity: float
    """probe diversity metric (direction: the task's `diversity_lower_is_better`)"""


def no_worse(diversity: float, target: float, lower_is_better: bool) -> bool:
    """Whether `diversity` is at least as good as `target` (False for NaN)."""
    return diversity <= target if lower_is_better else diversity >= target


def images_to_reach(curve: Sequence[CurvePoint], score: float, diversity: float,
                    lower_is_better: bool) -> float | None:
    """Images at which a run first reaches judge score ≥ `score` with diversity no worse than `diversity`;
    None if no probe does ("not reached").

    The first probe point meeting both conditions decides (a non-monotone curve that reaches the target and
    falls back counts at its first crossing). The crossing is placed by linear interpolation on the segment
    from the probe before it: both metrics move linearly along the segment, and the crossing is the first
    images count at which both conditions hold there. A target met at the first probe returns that probe's
    images (the curve has no earlier point to interpolate from).
    """
    points = sorted(curve, key=lambda p: p.images)
    for i, p in enumerate(points):
        if not (p.score >= score and no_worse(p.diversity, diversity, lower_is_better)):
            continue
        if i == 0:
            return float(p.images)
        q = points[i - 1]
        t_score = _entry(q.score, p.score, score, higher_is_better=True)
        t_diversity = _entry(q.diversity, p.diversity, diversity, higher_is_better=not lower_is_better)
        return float(q.images + max(t_score, t_diversity) * (p.images - q.images))
    return None


def _entry(start: float, end: float, target: float, higher_is_better: bool) -> float:
    """Fraction t ∈ [0, 1] of a segment from `start` to `end` (which meets `target`) from which on the linearly
    interpolated value meets it: 0 if `start` already does."""
    good = (lambda v: v >= target) if higher_is_better else (lambda v: v <= target)
    if good(start):
        return 0.0
    if math.isnan(start):  # nothing to interpolate from: the end point decides
        return 1.0
    return (target - start) / (end - start)  # end != start: end meets the target and start does not


@dataclass(frozen=True)
class SeedSummary:
    """A quantity over seeds where some seeds may have no value (e.g. "not reached")."""

    n: int
    """seeds"""
    reached: int
    """seeds with a value"""
    mean: float
    """mean over the seeds with a value (NaN if none)"""
    half_width: float
    """half-width of the Student-t confidence interval of that mean (NaN with fewer than 2 values)"""

    def __str__(self) -> str:
        if not self.reached:
            return "not reached"
        text = f"{self.mean:.0f}" + (f" ± {self.half_width:.0f}" if not math.isnan(self.half_width) else "")
        return text if self.reached == self.n else f"{text} (the {self.reached} that reached it)"


def summarise(values: Sequence[float | None], confidence: float = 0.95) -> SeedSummary:
    """Mean ± Student-t confidence interval (`confidence`, default 95 %) over the seeds whose value is not None.

    Seeds without a value are counted (`reached` of `n`), never filled in: with some seeds not reached, the mean
    is conditional on reaching, and the report says so (`SeedSummary.__str__`).
    """
    from scipy import stats  # a dependency of scikit-learn, declared in pyproject.toml for this use

    x = np.array([v for v in values if v is not None], dtype=float)
    if not len(x):
        return SeedSummary(len(values), 0, math.nan, math.nan)
    half = math.nan
    if len(x) > 1:
        half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return SeedSummary(len(values), len(x), float(x.mean()), half)


def dominates(a: CurvePoint, b: CurvePoint, lower_is_better: bool) -> bool:
    """a is at least as good as b in score and diversity, and better in one."""
    better_div = a.diversity < b.diversity if lower_is_better else a.diversity > b.diversity
    return (a.score >= b.score and no_worse(a.diversity, b.diversity, lower_is_better)
            and (a.score > b.score or better_div))


def pareto_front(points: Sequence[CurvePoint], lower_is_better: bool) -> list[CurvePoint]:
    """The points no other point dominates (judge score vs diversity), in order of images."""
    return sorted((p for p in points if not any(dominates(q, p, lower_is_better) for q in points)),
                  key=lambda p: p.images)


def select_checkpoint(validation: Sequence[CurvePoint], lower_is_better: bool) -> CurvePoint:
    """The reported checkpoint of a run: **the last checkpoint (most images) on the validation Pareto front of
    judge score vs diversity**. Its input is the validation probe curve and nothing else, so the test set
    cannot influence the choice; the chosen checkpoint is then evaluated once on the test set.

    Why the last on the front: among checkpoints no other beats on both axes, the one trained longest — a
    later checkpoint that lost score *and* diversity (over-optimisation) is never chosen over an earlier
    one that is better on both. Points with a NaN score or diversity are not candidates.
    """
    candidates = [p for p in validation if not (math.isnan(p.score) or math.isnan(p.diversity))]
    if not candidates:
        raise ValueError(f"select_checkpoint: no probe point with a finite score and diversity among {validation}")
    return pareto_front(candidates, lower_is_better)[-1]


def probe_curve(log_rows: Sequence[dict], score: str, diversity: str) -> list[CurvePoint]:
    """A run's validation curve from its log.csv rows (`agents.trainer`): the rows that carry probe columns."""
    def num(row, key):
        v = row.get(key, "")
        return float(v) if v not in ("", None) else math.nan

    return [CurvePoint(num(r, "images_seen"), num(r, score), num(r, diversity))
            for r in log_rows if r.get(score) not in ("", None)]


__all__ = ["CurvePoint", "SeedSummary", "dominates", "images_to_reach", "no_worse", "pareto_front", "probe_curve",
           "select_checkpoint", "summarise"]
