"""Plain sampling through the env: the base model's own sampler, batched, seeded, with NFE and timing.

`generate` is what `diffenv sample` and the CFG baselines use, so baselines and RL are measured by the
same code path as the environment itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm


@dataclass
class GenerationResult:
    images: torch.Tensor  # [N, C, H, W] in [0, 1]
    conditions: torch.Tensor  # [N] int64
    rewards: torch.Tensor  # [N] float32 (zeros when the env has no reward)
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N]
    nfe_per_image: float = 0.0
    wall_time_s: float = 0.0
    condition_names: list[str] = field(default_factory=list)  # the backend's name of every condition id
    num_steps: int = 0
    text_conditioned: bool = False  # conditions are prompts

    @property
    def prompts(self) -> list[str]:
        """The name (prompt, for a text-to-image model) of each image's condition: [N] strings."""
        return [self.condition_names[c] for c in self.conditions.tolist()]

    @property
    def seconds_per_image(self) -> float:
        return self.wall_time_s / max(1, len(self.images))


def run_episode(env, conditions: torch.Tensor | None = None, seed: int = 0) -> dict[str, Any]:
    """One synchronous episode of a `DiffusionSteerVectorEnv` with the base sampler's own noise.

    Noise mode: ε ~ N(0, I) from a generator seeded by `seed` (the plain sampler); initial-noise mode:
    the env's own x_T. Returns the terminal step's info plus `rewards` and `conditions`.
    """
    mode = env.cfg.action_mode
    if mode == "latent":
        raise ValueError("run_episode needs action_mode 'noise' or 'initial_noise'; 'latent' needs a policy")
    options = {} if conditions is None else {"conditions": conditions}
    obs, _ = env.reset(seed=seed, options=options)
    noise_gen = torch.Generator(device=env.device).manual_seed(seed + 7919)  # independent of x_T's stream
    while True:
        if mode == "noise":
            action = torch.randn(obs["latent"].shape, generator=noise_gen, device=env.device)
        else:
            action = obs["latent"]
        obs, reward, terminated, _, info = env.step(action)
        if terminated.all():
            return {**info, "rewards": reward, "conditions": obs["condition"] if "final_obs" not in info
                    else info["final_obs"]["condition"]}


def balanced_conditions(n: int, condition_ids: list[int]) -> torch.Tensor:
    """Conditions cycling through the set, so n images cover every condition evenly: [n] int64."""
    ids = torch.as_tensor(condition_ids, dtype=torch.long)
    return ids[torch.arange(n) % len(ids)]


def repeated_conditions(n: int, condition_ids: list[int], repeats: int, seed: int) -> torch.Tensor:
    """Conditions for n images over at most n // repeats distinct ones, cycling, so each gets ≥ `repeats` images
    (per-condition diversity is defined): the whole set when it is that small (then = `balanced_conditions`),
    else a fixed seeded choice from it (e.g. 50 of the `shapes` model's 1,155 training prompts for 200 images). [n]"""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    ids = torch.as_tensor(condition_ids, dtype=torch.long)
    k = max(1, n // repeats)
    if len(ids) > k:
        ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:k].sort().values]
    return balanced_conditions(n, ids.tolist())


def generate(n: int, *, batch_size: int = 250, seed: int = 0, conditions: torch.Tensor | None = None,
             condition_set=None, condition_repeats: int | None = None, progress: bool = False, env=None,
             warmup: bool = False, **env_kwargs: Any) -> GenerationResult:
    """Generate `n` images with the base sampler (noise mode, ε ~ N(0, I)) and score them.

    Batch j uses seed `seed + j`, so a run is reproducible for a fixed `batch_size`.
    `conditions` [n] fixes every image's condition; otherwise the images cycle through `condition_set`
    (the env's `conditions`: ids or split names; None = all), so each condition gets n / |set| images, or with
    `condition_repeats=r` through at most n // r of them (`repeated_conditions`, seeded by `seed`).
    `env_kwargs` go to `DiffusionSteerVectorEnv` (model, reward, num_steps, guidance_scale, ...).
    `warmup=True` runs one untimed episode first, so `wall_time_s` excludes first-call costs.
    """
    from diffenv.vector_env import DiffusionSteerVectorEnv

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batch = min(batch_size, n)
    if env is None:
        env = DiffusionSteerVectorEnv(num_envs=batch, conditions=condition_set, **env_kwargs)
    elif env_kwargs or condition_set is not None:
        raise ValueError(f"pass either env or env kwargs, not both (got {sorted(env_kwargs) or ['condition_set']})")
    batch = env.num_envs
    if conditions is None and condition_repeats is not None:
        conditions = repeated_conditions(n, env.condition_set.tolist(), condition_repeats, seed)
    elif conditions is None:
        conditions = balanced_conditions(n, env.condition_set.tolist())
    conditions = torch.as_tensor(conditions, dtype=torch.long)
    if conditions.shape != (n,):
        raise ValueError(f"conditions must have shape ({n},), got {tuple(conditions.shape)}")
    out: dict[str, list[torch.Tensor]] = {"images": [], "rewards": [], "nfe": []}
    comps: dict[str, list[torch.Tensor]] = {}
    if warmup:
        run_episode(env, None, seed=seed)
    start = time.perf_counter()
    chunks = range(0, n, batch)
    for j, lo in enumerate(tqdm(chunks, desc="sampling", disable=not progress, unit="batch")):
        take = min(batch, n - lo)
        cond = conditions[lo:lo + take]
        padded = torch.cat([cond, cond[-1:].expand(batch - take)]) if take < batch else cond
        info = run_episode(env, padded.to(env.device), seed=seed + j)
        out["images"].append(info["final_images"][:take].cpu())
        out["rewards"].append(info["rewards"][:take].cpu())
        out["nfe"].append(info["nfe"][:take].cpu())
        for k, v in info.get("reward_components", {}).items():
            comps.setdefault(k, []).append(v[:take].cpu())
    wall = time.perf_counter() - start
    return GenerationResult(
        images=torch.cat(out["images"]),
        conditions=conditions,
        rewards=torch.cat(out["rewards"]),
        components={k: torch.cat(v) for k, v in comps.items()},
        nfe_per_image=float(torch.cat(out["nfe"]).float().mean()),
        wall_time_s=wall,
        condition_names=list(env.backend.condition_names),
        num_steps=env.cfg.num_steps,
        text_conditioned=bool(getattr(env.backend, "text_conditioned", False)),
    )
