"""Evaluation of one comparison entry on a task's eval set (`eval_model`, `eval_best_of_n`), on the validation probe
set (`eval_probe`), and its row (`entry_metrics`); the task metrics themselves are `diffenv.metrics`."""

from __future__ import annotations

import time

import torch

from diffenv import DiffusionSteerVectorEnv
from diffenv.metrics import PROBE_BATCH, PROBE_REPEATS, PROBE_SEED
from diffenv.tasks import task_metrics
from diffenv.sampling import GenerationResult, balanced_conditions, generate


# ---------------------------------------------------------------------- evaluation of one entry
def entry_metrics(result, task) -> dict[str, float]:
    """A comparison entry's row: reward, cost and the task's metrics (`task_metrics`) of a `GenerationResult`."""
    row = {"reward_mean": result.rewards.mean().item(), "nfe_per_image": result.nfe_per_image,
           "ms_per_image": 1e3 * result.seconds_per_image}
    metrics = task_metrics(task.model)
    if metrics is not None:
        row.update(metrics(result.images, result.conditions))
    return row


#: the test set's batch size: batch j of the eval set (and of each best-of-N candidate set) uses seed start + j
EVAL_BATCH = 250
#: best-of-N candidate set j (1, 2, …) starts at seed eval_seed + j · CANDIDATE_SEED_STRIDE
CANDIDATE_SEED_STRIDE = 10_000


def eval_model(task, model, guidance_scale: float = 1.0):
    """The task's eval set (`agents.benchmark.compare.Task`: eval_images, eval_seed, eval_conditions, reward,
    num_steps, sampler) sampled from `model` (a name or a backend) at `guidance_scale`."""
    return generate(task.eval_images, batch_size=EVAL_BATCH, seed=task.eval_seed, model=model, reward=task.reward,
                    warmup=True,
                    num_steps=task.num_steps, sampler=task.sampler, guidance_scale=guidance_scale,
                    condition_set=task.eval_conditions)


def eval_probe(task, model, guidance_scale: float = 1.0):
    """The validation probe set, as `agents.trainer.Trainer.probe` samples it (`task.probe_images` images, seed
    `PROBE_SEED` in batches of `PROBE_BATCH`, the model's default sampler and condition set, which compare's runs
    train on), from `model` at `guidance_scale`: the test set (`eval_model`) shares none of its noise."""
    return generate(task.probe_images, batch_size=PROBE_BATCH, seed=PROBE_SEED, condition_repeats=PROBE_REPEATS,
                    model=model, reward=task.reward, num_steps=task.num_steps, guidance_scale=guidance_scale)


def eval_best_of_n(task, n_candidates: int):
    """N candidates per image at guidance 1 (distinct seeds, same condition); keep the best by reward."""
    env = DiffusionSteerVectorEnv(num_envs=min(EVAL_BATCH, task.eval_images), model=task.model, reward=task.reward,
                                  num_steps=task.num_steps, sampler=task.sampler, conditions=task.eval_conditions)
    cond = balanced_conditions(task.eval_images, env.condition_set.tolist())  # as every other entry
    generate(min(EVAL_BATCH, task.eval_images), env=env, seed=task.eval_seed)  # warm-up, untimed
    start = time.perf_counter()
    runs = [generate(task.eval_images, env=env, seed=task.eval_seed + CANDIDATE_SEED_STRIDE * (j + 1), conditions=cond)
            for j in range(n_candidates)]
    scores = torch.stack([r.rewards for r in runs])  # [N, n]
    best = scores.argmax(0)
    images = torch.stack([r.images for r in runs])[best, torch.arange(task.eval_images)]
    return GenerationResult(images=images, conditions=cond, rewards=scores.max(0).values,
                            nfe_per_image=sum(r.nfe_per_image for r in runs),
                            wall_time_s=time.perf_counter() - start)
