"""The one rollout format every algorithm trains on, and its collection from `DiffusionSteer-v0`.

A rollout is a `TensorDict` with batch size `[B]` (one row per generated image):

| key | shape | meaning |
|---|---|---|
| `latents` | [B, K+1, C, H, W] | the visited states x_T … x_0 (`latents[:, 0]` is the initial noise) |
| `log_probs` | [B, K] | log π_old(x_{t_{k+1}} | x_{t_k}, c), summed over dims (0 on σ = 0 steps) |
| `stds` | [B, K] | σ of each transition (0 = deterministic step, carries no policy gradient) |
| `conditions` | [B] | condition ids |
| `group_ids` | [B] | sub-envs sharing a condition (and, with `share_noise`, x_T) share a group id |
| `final_images` | [B, C', H', W'] | decoded x_0 in [0, 1] |
| `rewards` | [B] | terminal reward from the env |
| `train_steps` | [B, K] | optional: the steps the update trains on (`random_step_subset`; absent = every step) |

Algorithms add what they need in their `prepare` step (advantages, old model outputs, …).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict

from agents.policy import DiffusionPolicy
from diffenv.forward import ForwardProcess


@torch.no_grad()
def collect_rollout(policy: DiffusionPolicy, env, generator: torch.Generator) -> TensorDict:
    """Run one synchronous episode of a latent-mode env with `policy` acting; return the rollout.

    `env` must be a `DiffusionSteerVectorEnv` with `action_mode="latent"` built from
    `policy.env_kwargs()`: the env holds x_t, the condition and the reward; the policy draws x_{t−1}.
    """
    if env.cfg.action_mode != "latent":
        raise ValueError(f"collect_rollout needs an env with action_mode='latent', got {env.cfg.action_mode!r}")
    obs, _ = env.reset()
    x, c = obs["latent"], obs["condition"]
    latents, log_probs, stds = [x], [], []
    for k in range(policy.num_steps):
        idx = torch.full((env.num_envs,), k, dtype=torch.long, device=x.device)
        x, lp, _, std = policy.act(x, idx, c, generator=generator)
        obs, reward, terminated, _, info = env.step(x)
        latents.append(x)
        log_probs.append(lp)
        stds.append(std)
    if not terminated.all():
        raise RuntimeError("the env did not terminate after num_steps steps; does it use the policy's num_steps?")
    return TensorDict(
        {
            "latents": torch.stack(latents, 1),
            "log_probs": torch.stack(log_probs, 1),
            "stds": torch.stack(stds, 1),
            "conditions": c,
            "group_ids": env.group_ids.clone(),
            "final_images": info["final_images"],
            "rewards": reward,
        },
        batch_size=[env.num_envs],
        device=x.device,
    )


def random_step_subset(eligible: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A random subset of each trajectory's steps to train on (DanceGRPO / MixGRPO's lever): bool [B, K].

    Row i keeps m_i = max(1, round(fraction · n_i)) of its n_i `eligible` steps [B, K], drawn uniformly without
    replacement. Each eligible step of row i is then kept with probability m_i / n_i, so a loss that is a mean
    over a trajectory's steps, estimated by the mean over the kept ones, is unbiased: E[(1/m) Σ_kept ℓ_k] =
    (1/n) Σ ℓ_k (tests/test_rollout.py checks it). Draws come from `generator` (CPU), so resume stays exact.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction}: expected 0 < fraction <= 1")
    n = eligible.sum(1, keepdim=True)  # [B, 1]
    keep = (n * fraction).round().clamp(min=1)
    scores = torch.rand(eligible.shape, generator=generator).to(eligible.device)
    scores = scores.masked_fill(~eligible, 2.0)  # ineligible steps sort last
    rank = scores.argsort(1).argsort(1)  # each step's position in a random order of the row's eligible steps
    return eligible & (rank < keep)


def transitions(rollout: TensorDict, stochastic_only: bool = True) -> TensorDict:
    """Flatten a rollout into its per-step transitions: batch [B·K'] with x_t, x_{t−1}, k, c, ….

    Keys: `latents`, `next_latents`, `step_index`, `conditions`, `log_probs`, `sample_index`, plus every
    other per-sample key of the rollout broadcast to its steps (e.g. `advantages`). With
    `stochastic_only`, steps whose σ is 0 are dropped: their log-prob is a constant 0. With a `train_steps`
    mask in the rollout, only the steps it keeps are returned.
    """
    b, k = rollout["log_probs"].shape
    lat = rollout["latents"]
    per_step = {
        "latents": lat[:, :-1].reshape(b * k, *lat.shape[2:]),
        "next_latents": lat[:, 1:].reshape(b * k, *lat.shape[2:]),
        "step_index": torch.arange(k, device=lat.device).repeat(b),
        "log_probs": rollout["log_probs"].reshape(-1),
        "stds": rollout["stds"].reshape(-1),
        "sample_index": torch.arange(b, device=lat.device).repeat_interleave(k),
    }
    skip = {"latents", "log_probs", "stds", "final_images", "train_steps"}
    for key in rollout.keys():
        if key not in skip and key not in per_step:
            per_step[key] = rollout[key].repeat_interleave(k, dim=0)
    td = TensorDict(per_step, batch_size=[b * k], device=lat.device)
    keep = td["stds"] > 0 if stochastic_only else None
    if "train_steps" in rollout.keys():
        mask = rollout["train_steps"].reshape(-1)
        keep = mask if keep is None else keep & mask
    if keep is not None:
        td = td[keep.nonzero().squeeze(1)]  # one index for every key: one host sync, not one per key
    return td


def forward_draws(rollout: TensorDict, n_draws: int, process: ForwardProcess, generator: torch.Generator,
                  times: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TensorDict:
    """Each final sample x0 noised `n_draws` times by the model's forward process (DiffusionNFT, AWM): batch [B·n].

    Keys: `x0`, `latents` (x_u), `timesteps` (the network's), `times` (u ∈ [0, 1)), `noises` (ε), plus every other
    per-sample key of the rollout (conditions, group_ids, rewards, advantages, …) repeated n times. (u, ε) come
    from `process.draw` with `generator`; `times` maps the uniform u to another time distribution first.
    """
    x0 = rollout["latents"][:, -1].repeat_interleave(n_draws, dim=0)  # [B·n, C, H, W]
    u, eps = process.draw(len(x0), x0.shape[1:], generator)
    if times is not None:
        u = times(u)
    x_t, timesteps = process.noise(x0, u, eps)
    items = {"x0": x0, "latents": x_t, "timesteps": timesteps, "times": u, "noises": eps}
    skip = {"latents", "log_probs", "stds", "final_images", "train_steps"}
    for key in rollout.keys():
        if key not in skip:
            items[key] = rollout[key].repeat_interleave(n_draws, dim=0)
    return TensorDict(items, batch_size=[len(x0)], device=x0.device)
