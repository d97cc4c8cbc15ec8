"""TorchRL integration (docs/design.md §5): `DiffusionSteer-v0` as a native `EnvBase`, the diffusion policy as a
`ProbabilisticActor`, and a small generic actor-critic for noise-space RL (DSRL, docs/design.md §7.9).

    env = DiffusionSteerTorchRLEnv(num_envs=16, **policy.env_kwargs(), action_mode="latent")
    actor = make_diffusion_actor(policy)                 # π_θ(x_{t−1} | x_t, c) = N(μ_θ, σ_t² I)
    loss = ClipPPOLoss(actor, critic_network=None)       # with a precomputed group advantage [B, 1]
    collector = Collector(env, actor, frames_per_batch=16 * policy.num_steps, total_frames=-1)

Observation keys are the gymnasium ones (`latent`, `timestep`, `condition`); actors map `timestep`
back to the sampler's step index, so they also work on envs that do not expose it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributions as D
from gymnasium import spaces
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import IndependentNormal, ProbabilisticActor, ValueOperator

from agents.advantages import group_advantages
from agents.integrations.nets import LatentEncoder
from agents.policy import DiffusionPolicy
from diffenv.samplers import gaussian_log_prob
from diffenv.vector_env import DiffusionSteerVectorEnv

OBS_KEYS = ("latent", "timestep", "condition")
LOG_PROB_KEY = "action_log_prob"  # ClipPPOLoss's default when composite_lp_aggregate() is False

__all__ = [
    "DiffusionSteerTorchRLEnv", "DiffusionStepNormal", "evaluate", "make_diffusion_actor",
    "make_noise_actor_critic", "spec_from_space", "terminal_group_advantage",
]


# ----------------------------------------------------------------------------------------- env


def spec_from_space(space: spaces.Space, batch_size: tuple[int, ...], device) -> Any:
    """The TorchRL spec of a gymnasium space (Dict → Composite, Box → Bounded/Unbounded, Discrete →
    Categorical), with `batch_size` prepended to every leaf shape."""
    batch = torch.Size(batch_size)
    if isinstance(space, spaces.Dict):
        return Composite({k: spec_from_space(v, batch, device) for k, v in space.spaces.items()},
                         shape=batch, device=device)
    if isinstance(space, spaces.Box):
        shape = batch + space.shape
        dtype = torch.from_numpy(np.zeros((), space.dtype)).dtype
        if np.isfinite(space.low).all() and np.isfinite(space.high).all():
            low, high = (torch.as_tensor(b, dtype=dtype).expand(shape) for b in (space.low, space.high))
            return Bounded(low, high, shape=shape, dtype=dtype, device=device)
        return Unbounded(shape=shape, dtype=dtype, device=device)
    if isinstance(space, spaces.Discrete):
        if space.start != 0:
            raise ValueError(f"Discrete spaces must start at 0 to map to Categorical, got start={space.start}")
        return Categorical(int(space.n), shape=batch, dtype=torch.int64, device=device)
    raise TypeError(f"no TorchRL spec for {type(space).__name__}; expected Dict, Box or Discrete")


class DiffusionSteerTorchRLEnv(EnvBase):
    """`DiffusionSteer-v0` as a native TorchRL env: batch_size `[num_envs]` on the vector env's device.

    One `_step` is one batched step of `DiffusionSteerVectorEnv` (no loop over sub-envs). The vector env
    runs with `autoreset_mode="disabled"`: TorchRL resets finished sub-envs itself through the `"_reset"`
    mask, forwarded as the vector env's `reset_mask`. Rewards and done flags are `[N, 1]`.

    Args:
        num_envs: N, sub-envs stepped together (a multiple of `group_size`).
        **kwargs: the env's arguments (`diffenv.env.DiffusionSteerEnv`), e.g. `policy.env_kwargs()`.
    """

    def __init__(self, num_envs: int = 8, **kwargs: Any):
        venv = DiffusionSteerVectorEnv(num_envs, autoreset_mode="disabled", **kwargs)
        super().__init__(device=venv.device, batch_size=torch.Size([venv.num_envs]))
        self.vector_env = venv
        batch = (venv.num_envs,)
        self.observation_spec = spec_from_space(venv.single_observation_space, batch, self.device)
        self.action_spec = spec_from_space(venv.single_action_space, batch, self.device)
        self.reward_spec = Unbounded(shape=(*batch, 1), dtype=torch.float32, device=self.device)
        flag = Categorical(2, shape=(*batch, 1), dtype=torch.bool, device=self.device)
        self.done_spec = Composite(done=flag.clone(), terminated=flag.clone(), truncated=flag.clone(),
                                   shape=batch, device=self.device)

    @property
    def group_size(self) -> int:
        return self.vector_env.cfg.group_size

    @property
    def episode_length(self) -> int:
        return self.vector_env.episode_length

    def _output(self, obs: dict[str, torch.Tensor], done: torch.Tensor, **extra) -> TensorDict:
        flags = done.view(-1, 1)
        return TensorDict({**{k: obs[k].clone() for k in OBS_KEYS}, "done": flags.clone(),
                           "terminated": flags.clone(), "truncated": torch.zeros_like(flags), **extra},
                          batch_size=self.batch_size, device=self.device)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDict:
        mask = None
        if tensordict is not None and "_reset" in tensordict.keys() and self.vector_env.started:
            mask = tensordict.get("_reset").reshape(self.batch_size).to(self.device, torch.bool)
        obs, _ = self.vector_env.reset(options={"reset_mask": mask} if mask is not None else None)
        done = self.vector_env.step_index >= self.episode_length  # False on the rows just reset
        return self._output(obs, done)

    def _step(self, tensordict: TensorDictBase) -> TensorDict:
        obs, reward, terminated, _, _ = self.vector_env.step(tensordict.get("action"))
        return self._output(obs, terminated, reward=reward.view(-1, 1).float())

    def _set_seed(self, seed: int | None) -> None:
        if seed is not None:  # the one generator that draws conditions and x_T of every sub-env
            self.vector_env.generator.manual_seed(int(seed))


def terminal_group_advantage(batch: TensorDictBase, group_size: int) -> torch.Tensor:
    """GRPO advantage of a collected `[N, T]` batch whose episodes end at its last step: the group-
    normalised terminal reward of each sub-env (groups = `group_size` consecutive sub-envs),
    broadcast to every step as `[N, T, 1]` (the shape `ClipPPOLoss` expects per step)."""
    done = batch["next", "done"][:, -1, 0]
    if not bool(done.all()):
        raise ValueError("every episode must end at the batch's last step; use frames_per_batch = "
                         "num_envs * episode_length and start collection right after a reset")
    n, t = batch.batch_size[:2]
    rewards = batch["next", "reward"][:, -1, 0]
    groups = torch.arange(n, device=rewards.device) // group_size
    return group_advantages(rewards, groups).view(n, 1, 1).expand(n, t, 1).contiguous()


@torch.no_grad()
def evaluate(env: DiffusionSteerTorchRLEnv, actor, seed: int,
             exploration: ExplorationType = ExplorationType.RANDOM) -> float:
    """Mean terminal reward of one episode per sub-env, from a fixed env seed and torch seed (the
    actor's sampling noise). `RANDOM` samples the policy, `DETERMINISTIC` uses its mean."""
    env.set_seed(seed)
    torch.manual_seed(seed)
    with set_exploration_type(exploration):
        td = env.rollout(env.episode_length, actor)
    return td["next", "reward"][:, -1].mean().item()


# ----------------------------------------------------------------------------------------- diffusion actor


class DiffusionStepNormal(D.Distribution):
    """`N(loc, scale² I)` over a latent event `[C, H, W]` with one σ per sample (batch shape = `scale`'s).

    Unlike `IndependentNormal`, σ = 0 is allowed (e.g. DDIM's last step): such a step is a point mass,
    samples are `loc` and the log-prob is 0 (`diffenv.samplers.gaussian_log_prob`), never NaN. The
    log-prob is the exact sum over latent dims, as the policy's.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, event_dim: int = 3):
        batch_shape, event_shape = loc.shape[:-event_dim], loc.shape[-event_dim:]
        self.loc, self.scale = loc, scale.expand(batch_shape)
        super().__init__(batch_shape, event_shape, validate_args=False)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    mode = mean
    deterministic_sample = mean

    def _scale_like(self, value: torch.Tensor) -> torch.Tensor:
        return self.scale.reshape(*self.scale.shape, *([1] * len(self.event_shape))).to(value.dtype)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        noise = torch.randn(shape, device=self.loc.device, dtype=self.loc.dtype)
        return self.loc + self._scale_like(self.loc) * noise  # σ = 0 rows are exactly `loc`

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        lead = value.shape[:-len(self.event_shape)]  # sample_shape + batch_shape

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.expand(*lead, *self.event_shape).reshape(-1, *self.event_shape)

        lp = gaussian_log_prob(flat(value), flat(self.loc), self.scale.expand(lead).reshape(-1))
        return lp.reshape(lead)

    def entropy(self) -> torch.Tensor:
        d = math.prod(self.event_shape)
        safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
        h = d * (0.5 * math.log(2 * math.pi * math.e) + torch.log(safe))
        return torch.where(self.scale > 0, h, torch.zeros_like(h))


class DiffusionStepParams(nn.Module):
    """(latent, timestep, condition) → (loc, scale) of the policy's step Gaussian; any leading batch dims."""

    def __init__(self, policy: DiffusionPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, latent, timestep, condition):
        lead, event = latent.shape[:-3], latent.shape[-3:]
        k = self.policy.sampler.step_index_of(timestep)
        mean, std = self.policy.distribution(latent.reshape(-1, *event), k, condition.reshape(-1))
        return mean.to(latent.dtype).reshape(latent.shape), std.to(latent.dtype).reshape(lead)


def make_diffusion_actor(policy: DiffusionPolicy, return_log_prob: bool = True) -> ProbabilisticActor:
    """The diffusion policy as a TorchRL actor for `action_mode="latent"` envs built from `policy.env_kwargs()`.

    Reads `latent`, `timestep` (→ step index), `condition`; writes `loc`, `scale` [B], `action` (x_{t−1})
    and, with `return_log_prob`, `action_log_prob` [B] = `policy.log_prob` (0 on σ = 0 steps).
    Gradients reach only the LoRA parameters (`policy.trainable_parameters()`).
    """
    params = TensorDictModule(DiffusionStepParams(policy), in_keys=list(OBS_KEYS), out_keys=["loc", "scale"])
    return ProbabilisticActor(params, in_keys=["loc", "scale"], out_keys=["action"],
                              distribution_class=DiffusionStepNormal, return_log_prob=return_log_prob,
                              log_prob_key=LOG_PROB_KEY)


# ----------------------------------------------------------------------------------------- noise-space actor-critic


class _NoiseMean(nn.Module):
    """ε mean (zero at init: the initial policy is the base sampler, ε ~ N(0, I)) and a learned std."""

    def __init__(self, latent_shape, n_conditions: int, hidden: int, init_std: float):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        self.encoder = LatentEncoder(latent_shape, n_conditions, hidden)
        self.mean = nn.Linear(hidden, math.prod(latent_shape))
        nn.init.zeros_(self.mean.weight)
        nn.init.zeros_(self.mean.bias)
        self.log_std = nn.Parameter(torch.full(self.latent_shape, math.log(init_std)))

    def forward(self, latent, timestep, condition):
        h = self.encoder(latent, timestep, condition)
        loc = self.mean(h).reshape(*h.shape[:-1], *self.latent_shape)
        return loc, self.log_std.exp().expand_as(loc)


class _Value(nn.Module):
    def __init__(self, latent_shape, n_conditions: int, hidden: int):
        super().__init__()
        self.encoder = LatentEncoder(latent_shape, n_conditions, hidden)
        self.value = nn.Linear(hidden, 1)

    def forward(self, latent, timestep, condition):
        return self.value(self.encoder(latent, timestep, condition))


def make_noise_actor_critic(env: DiffusionSteerTorchRLEnv, hidden: int = 128, init_std: float = 1.0):
    """(actor, critic) for `action_mode="noise"` (or `"initial_noise"`): a Gaussian over ε whose mean is a
    CNN of (latent, timestep, condition), zero at initialisation, with a learned per-dim std; and a
    `ValueOperator` writing `state_value` [.., 1]. Use with `GAE` and `ClipPPOLoss`."""
    venv = env.vector_env
    shape, n_cond = tuple(venv.backend.latent_shape), venv.backend.n_conditions
    mean = TensorDictModule(_NoiseMean(shape, n_cond, hidden, init_std), in_keys=list(OBS_KEYS),
                            out_keys=["loc", "scale"])
    actor = ProbabilisticActor(mean, in_keys=["loc", "scale"], out_keys=["action"],
                               distribution_class=IndependentNormal, distribution_kwargs={"event_dim": 3},
                               return_log_prob=True, log_prob_key=LOG_PROB_KEY)
    critic = ValueOperator(_Value(shape, n_cond, hidden), in_keys=list(OBS_KEYS))
    return actor, critic
