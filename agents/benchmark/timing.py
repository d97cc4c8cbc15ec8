"""Inference cost measured so that entries compare: every entry of a task timed interleaved, in one process.

Each entry's test-set evaluation times itself, but those evaluations run minutes or hours apart, beside whatever
else the machine ran then: the first shapes comparison put the merged LoRAs at 34.7 ms/image against the base's
22.9 at the same 20 NFE, while back to back the two cost the same. So `compare` times every entry again, here:

- each entry samples the same `TIMING_IMAGES` conditions with the same seed, after one untimed warm-up call;
- `TIMING_ROUNDS` rounds, each timing every entry once, the order rotated by one per round (no entry always runs
  first after the previous round); an entry's figure is its median round;
- CFG and RL entries sample without a reward (their deployed cost); best-of-N samples its N candidates and scores
  them, since it needs the reward to choose;
- `ms_per_image` is that median per image, `time_vs_base` its ratio to the base at guidance 1 (the same model and
  sampler, 1 NFE per step), the figure to read across machines.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

TIMING_IMAGES, TIMING_ROUNDS = 64, 3


def interleaved_seconds(entries: dict[str, Callable[[], object]], rounds: int = TIMING_ROUNDS) -> dict[str, float]:
    """Median wall seconds of each callable over `rounds` rounds of all of them, rotated (after one warm-up each)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: expected >= 1")
    for fn in entries.values():
        fn()  # first-call costs (allocations, lazy imports) are not the entry's
    keys, times = list(entries), {k: [] for k in entries}
    for r in range(rounds):
        shift = r % max(1, len(keys))
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            entries[key]()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def sampler(task, model, guidance_scale: float = 1.0, candidates: int = 1) -> Callable[[], object]:
    """A callable that samples the task's first `TIMING_IMAGES` eval conditions from `model` (a name or backend):
    `candidates` > 1 is best-of-N (N samplings, scored by the task's reward)."""
    from diffenv import DiffusionSteerVectorEnv
    from diffenv.sampling import balanced_conditions, generate

    n = min(TIMING_IMAGES, task.eval_images)
    env = DiffusionSteerVectorEnv(num_envs=n, model=model, reward=task.reward if candidates > 1 else None,
                                  num_steps=task.num_steps, sampler=task.sampler, guidance_scale=guidance_scale,
                                  conditions=task.eval_conditions)
    conditions = balanced_conditions(n, env.condition_set.tolist())

    def run():
        return [generate(n, env=env, seed=task.eval_seed + j, conditions=conditions) for j in range(candidates)]

    return run


def apply_timings(rows: list[dict], per_image: dict[str, float], key: Callable[[dict], str], base_key: str,
                  cfg_key: str | None = None) -> None:
    """Set each row's `ms_per_image` and `time_vs_base` from the interleaved seconds `per_image` of its entry
    (`key(row)`), relative to the entry `base_key`, and `time_vs_cfg` relative to `cfg_key` when given (in place)."""
    ratios = {"time_vs_base": per_image.get(base_key)}
    if cfg_key is not None:
        ratios["time_vs_cfg"] = per_image.get(cfg_key)
    for r in rows:
        k = key(r)
        if k in per_image:
            r["ms_per_image"] = 1e3 * per_image[k]
            r |= {name: per_image[k] / ref if ref else float("nan") for name, ref in ratios.items()}
