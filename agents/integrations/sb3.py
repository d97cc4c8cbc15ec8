"""Stable-Baselines3 integration (docs/design.md §5): a `VecEnv` over the native batch, a latent features
extractor, and `DiffusionActorCriticPolicy`, which lets SB3's own PPO fine-tune the diffusion model.

Noise-space RL (DSRL, Wagenmaker et al. 2025; docs/design.md §7.9) with any SB3 algorithm:

    venv = VecMonitor(DiffusionSteerSB3VecEnv(64, model="digits-flow", num_steps=3, action_mode="noise"))
    model = PPO("MultiInputPolicy", venv, policy_kwargs=latent_policy_kwargs(), gamma=1.0)

Fine-tuning the model itself (latent mode, DDPO-style, with SB3's GAE critic):

    venv = DiffusionSteerSB3VecEnv(32, model="digits-flow", num_steps=3, action_mode="latent")
    model = PPO(DiffusionActorCriticPolicy, venv,
                policy_kwargs={"diffusion_kwargs": {"model": "digits-flow", "num_steps": 3}})
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from agents.policy import DiffusionPolicy
from agents.integrations.nets import LatentEncoder
from diffenv.env import DiffusionSteerEnv
from diffenv.samplers import gaussian_log_prob
from diffenv.vector_env import DiffusionSteerVectorEnv

#: SB3 needs a finite action box; ±3 keeps 99.7 % of N(0, 1) noise (DSRL's implicit regulariser) and
#: ±10 never binds on latents of data in [-1, 1].
DEFAULT_ACTION_BOUND = {"noise": 3.0, "initial_noise": 3.0, "latent": 10.0}

__all__ = [
    "DEFAULT_ACTION_BOUND", "ClipToBox", "DiffusionActorCriticPolicy", "DiffusionSteerSB3VecEnv",
    "DiffusionStepDistribution", "LatentFeaturesExtractor", "evaluate", "latent_policy_kwargs",
    "load_training_state", "make_single_env", "save_training_state",
]


def _action_bound(kwargs: dict[str, Any]) -> float:
    mode = kwargs.get("action_mode", "noise")
    bound = kwargs.pop("action_bound", None)
    bound = DEFAULT_ACTION_BOUND.get(mode, DEFAULT_ACTION_BOUND["noise"]) if bound is None else bound
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < math.inf:
        raise ValueError(f"SB3 needs a finite action box: action_bound must be a number in (0, inf), got {bound!r}")
    return float(bound)


def _numpy_obs(obs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in obs.items()}


# ----------------------------------------------------------------------------------------- envs


class ClipToBox(gym.ActionWrapper):
    """Declares the finite action box `[−bound, bound]` SB3 requires and clips actions into it."""

    def __init__(self, env: gym.Env, bound: float):
        super().__init__(env)
        space = env.action_space
        self.action_space = spaces.Box(-bound, bound, space.shape, np.float32)

    def action(self, action):
        return np.clip(np.asarray(action, np.float32), self.action_space.low, self.action_space.high)


def make_single_env(action_bound: float | None = None, **kwargs: Any) -> gym.Env:
    """The single numpy env (`DiffusionSteerEnv`) with a finite action box, as SB3's `check_env` wants.

    Noise mode uses the env's own `action_bound`; other modes are wrapped in `ClipToBox`.
    """
    kwargs = dict(kwargs, action_bound=action_bound)
    bound = _action_bound(kwargs)
    if kwargs.get("action_mode", "noise") == "noise":
        return DiffusionSteerEnv(action_bound=bound, **kwargs)
    return ClipToBox(DiffusionSteerEnv(**kwargs), bound)


class DiffusionSteerSB3VecEnv(VecEnv):
    """`DiffusionSteer-v0` as an SB3 `VecEnv`: one batched step of `DiffusionSteerVectorEnv` per call.

    SB3 semantics: numpy observations; a finished sub-env is reset in the same step (the returned obs
    is the next episode's first), and its info holds `terminal_observation`, `TimeLimit.truncated` and
    the terminal `reward_components`. Actions are clipped to the finite box `[−action_bound, action_bound]`
    (default `DEFAULT_ACTION_BOUND[action_mode]`). One torch generator drives every sub-env, so
    `seed(s)` seeds the whole batch (with `s`; SB3's per-env offsets are not needed).

    Args:
        num_envs: sub-envs stepped together.
        action_bound: half-width of the action box.
        **kwargs: the env's arguments (`diffenv.env.DiffusionSteerEnv`).
    """

    render_mode = None

    def __init__(self, num_envs: int = 8, action_bound: float | None = None, **kwargs: Any):
        kwargs = dict(kwargs, action_bound=action_bound)
        bound = _action_bound(kwargs)
        if kwargs.get("action_mode", "noise") == "noise":
            kwargs["action_bound"] = bound  # the env clamps noise itself
        self.vector_env = DiffusionSteerVectorEnv(num_envs, autoreset_mode="same_step", **kwargs)
        self.action_bound = bound
        shape = self.vector_env.single_action_space.shape
        super().__init__(self.vector_env.num_envs, self.vector_env.single_observation_space,
                         spaces.Box(-bound, bound, shape, np.float32))
        self._actions: torch.Tensor | None = None

    def reset(self):
        seed = self._seeds[0]
        options = self._options[0] or None
        obs, _ = self.vector_env.reset(seed=None if seed is None else int(seed), options=options)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return _numpy_obs(obs)

    def step_async(self, actions: np.ndarray) -> None:
        a = torch.as_tensor(np.asarray(actions, np.float32), device=self.vector_env.device)
        self._actions = a.reshape(self.num_envs, *self.action_space.shape).clamp(-self.action_bound, self.action_bound)

    def step_wait(self):
        obs, reward, terminated, truncated, info = self.vector_env.step(self._actions)
        dones = (terminated | truncated).cpu().numpy()
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if dones.any():
            final = _numpy_obs(info["final_obs"])
            comps = {k: v.detach().cpu().numpy() for k, v in info.get("reward_components", {}).items()}
            trunc = (truncated & ~terminated).cpu().numpy()
            for i in np.flatnonzero(dones):
                infos[i]["terminal_observation"] = {k: v[i] for k, v in final.items()}
                infos[i]["TimeLimit.truncated"] = bool(trunc[i])
                infos[i]["reward_components"] = {k: float(v[i]) for k, v in comps.items()}
        return _numpy_obs(obs), reward.detach().cpu().numpy().astype(np.float32), dones, infos

    def close(self) -> None:
        self.vector_env.close()

    def _indices(self, indices) -> Sequence[int]:
        if indices is None:
            return range(self.num_envs)
        return [indices] if isinstance(indices, int) else list(indices)

    # The sub-envs are rows of one batched env: attributes and methods are the batch's, shared by all.
    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        value = self.render_mode if attr_name == "render_mode" else getattr(self.vector_env, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.vector_env, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        result = getattr(self.vector_env, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._indices(indices)]


def evaluate(model, venv: DiffusionSteerSB3VecEnv, seed: int, deterministic: bool = False) -> float:
    """Mean terminal reward of one episode per sub-env, from a fixed env seed and torch seed."""
    torch.manual_seed(seed)
    venv.seed(seed)
    obs, total = venv.reset(), np.zeros(venv.num_envs)
    for _ in range(venv.vector_env.episode_length):
        action, _ = model.predict(obs, deterministic=deterministic)
        obs, reward, _, _ = venv.step(action)
        total += reward
    return float(total.mean())


# ----------------------------------------------------------------------------------------- networks


class LatentFeaturesExtractor(BaseFeaturesExtractor):
    """SB3 features from the Dict observation: a small CNN on the latent + timestep + condition embedding.

    SB3 would flatten a float latent (it treats only uint8 boxes as images); this keeps policies small
    for any latent size. `condition` arrives one-hot (SB3's preprocessing of `Discrete`).
    """

    def __init__(self, observation_space: spaces.Dict, features_dim: int = 128):
        super().__init__(observation_space, features_dim)
        latent = observation_space["latent"]
        self.encoder = LatentEncoder(latent.shape, int(observation_space["condition"].n), features_dim)

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(observations["latent"], observations["timestep"], observations["condition"])


def latent_policy_kwargs(features_dim: int = 128, **kwargs: Any) -> dict[str, Any]:
    """`policy_kwargs` for SB3's `MultiInputPolicy` (PPO, A2C, SAC, …) on this env."""
    return dict(features_extractor_class=LatentFeaturesExtractor,
                features_extractor_kwargs={"features_dim": features_dim}, **kwargs)


class DiffusionStepDistribution(Distribution):
    """SB3 distribution of one denoising step: `N(mean, σ_t² I)` over flat actions [B, D], σ_t [B] fixed by
    the sampler (not learned). σ = 0 steps are point masses: action = mean, log-prob 0 (never NaN)."""

    def __init__(self, action_dim: int):
        super().__init__()
        self.action_dim = action_dim
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def proba_distribution_net(self, *args, **kwargs):
        raise NotImplementedError("the mean comes from the diffusion model; there is no action net")

    def proba_distribution(self, mean: torch.Tensor, std: torch.Tensor) -> "DiffusionStepDistribution":
        self.mean, self.std = mean.reshape(len(mean), -1), std.reshape(-1)
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(actions.reshape(len(actions), -1), self.mean, self.std)

    def entropy(self) -> torch.Tensor:  # constant in θ: σ is the sampler's
        safe = torch.where(self.std > 0, self.std, torch.ones_like(self.std))
        h = self.action_dim * (0.5 * math.log(2 * math.pi * math.e) + torch.log(safe))
        return torch.where(self.std > 0, h, torch.zeros_like(h))

    def sample(self) -> torch.Tensor:
        return self.mean + self.std[:, None] * torch.randn_like(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def actions_from_params(self, mean, std, deterministic: bool = False) -> torch.Tensor:
        return self.proba_distribution(mean, std).get_actions(deterministic=deterministic)

    def log_prob_from_params(self, mean, std):
        actions = self.actions_from_params(mean, std)
        return actions, self.log_prob(actions)


class DiffusionActorCriticPolicy(ActorCriticPolicy):
    """SB3 actor-critic whose actor is a `DiffusionPolicy` (LoRA-adapted denoiser): for `action_mode="latent"`.

    The action (x_{t−1}) is drawn from `N(μ_θ(x_t, t, c), σ_t² I)` with σ_t the sampler's (not learned),
    so SB3's PPO fine-tunes the LoRA; the critic is `LatentFeaturesExtractor` + an MLP. Only LoRA and
    critic parameters are optimised. The env must use the policy's model and sampler (`env_kwargs()`).

    Args:
        diffusion_kwargs: `DiffusionPolicy` arguments (model *name*, num_steps, sampler, lora_rank, …);
            stored with `.save` so `PPO.load` rebuilds the same model and then loads the weights.
        Other arguments as `ActorCriticPolicy` (net_arch applies to the critic only).
    """

    def __init__(self, observation_space, action_space, lr_schedule, diffusion_kwargs: dict | None = None,
                 **kwargs: Any):
        self.diffusion_kwargs = dict(diffusion_kwargs or {})
        kwargs.setdefault("features_extractor_class", LatentFeaturesExtractor)
        kwargs.setdefault("net_arch", dict(pi=[], vf=[64, 64]))
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule) -> None:
        self.diffusion = DiffusionPolicy(**self.diffusion_kwargs)
        if tuple(self.diffusion.backend.latent_shape) != tuple(self.action_space.shape):
            raise ValueError(f"the diffusion model's latent shape {tuple(self.diffusion.backend.latent_shape)} "
                             f"does not match the action space {self.action_space.shape}")
        self.action_dist = DiffusionStepDistribution(int(np.prod(self.action_space.shape)))
        self._build_mlp_extractor()
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
        if self.ortho_init:
            for module, gain in ((self.features_extractor, np.sqrt(2)), (self.mlp_extractor, np.sqrt(2)),
                                 (self.value_net, 1.0)):
                module.apply(lambda m, g=gain: self.init_weights(m, gain=g))
        trainable = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "diffusion_kwargs": self.diffusion_kwargs}

    def _action_distribution(self, obs: dict[str, torch.Tensor]) -> DiffusionStepDistribution:
        latent = obs["latent"].float()
        if latent.device != self.diffusion.device:
            raise ValueError(f"observations are on {latent.device} but the diffusion model is on "
                             f"{self.diffusion.device}; pass the same device to the algorithm (device=...) "
                             "and to diffusion_kwargs['device']")
        k = self.diffusion.sampler.step_index_of(obs["timestep"])
        condition = obs["condition"].reshape(len(latent), -1)[:, 0]  # ids, [B] (collection) or [B, 1] (buffer)
        condition = condition.round().long() if condition.is_floating_point() else condition.long()
        mean, std = self.diffusion.distribution(latent, k, condition)
        return self.action_dist.proba_distribution(mean.float(), std.float())

    def forward(self, obs, deterministic: bool = False):
        distribution = self._action_distribution(obs)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        return actions.reshape((-1, *self.action_space.shape)), self.predict_values(obs), log_prob

    def evaluate_actions(self, obs, actions: torch.Tensor):
        distribution = self._action_distribution(obs)
        return self.predict_values(obs), distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs) -> DiffusionStepDistribution:
        return self._action_distribution(obs)

    def _predict(self, observation, deterministic: bool = False) -> torch.Tensor:
        return self._action_distribution(observation).get_actions(deterministic=deterministic)


# ----------------------------------------------------------------------------------------- weights-only state

#: `format` metadata of `save_training_state` files
TRAINING_STATE_FORMAT = "diffenv-sb3-training-state-v1"


def save_training_state(model, path: str | os.PathLike) -> Path:
    """Weights-only snapshot of an SB3 algorithm, to continue training it: one safetensors file (atomic).

    Unlike `model.save` (a zip whose `data` entry is unpickled by `PPO.load`, so a crafted file runs
    code), this holds only tensors — the policy's `state_dict` (`policy.*`) and its optimizer's
    state (`optimizer.<param index>.<name>`) — and plain JSON metadata (the timestep and update
    counters). Read it back with `load_training_state` into an algorithm built with the same arguments.
    """
    from safetensors.torch import save_file

    path = Path(path)
    # clone: SB3 shares the features extractor between actor and critic, and safetensors refuses shared storage
    tensors = {f"policy.{k}": v.detach().cpu().clone() for k, v in model.policy.state_dict().items()}
    for index, state in model.policy.optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().clone()
    counters = {"num_timesteps": int(model.num_timesteps), "n_updates": int(getattr(model, "_n_updates", 0))}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": TRAINING_STATE_FORMAT, "counters": json.dumps(counters)})
    os.replace(tmp, path)
    return path


def load_training_state(model, path: str | os.PathLike) -> None:
    """Load a `save_training_state` file into `model` (built with the arguments it was saved with).

    Only safetensors and JSON are parsed (no pickle). Raises `ValueError` naming the file when it is
    not such a snapshot or does not fit `model`'s policy and optimizer.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        counters = json.loads(meta.get("counters", "null"))
    except Exception as e:  # safetensors raises its own error types on corrupt headers
        raise ValueError(f"{path} is not a readable SB3 training state (safetensors + JSON): {e}") from e
    if meta.get("format") != TRAINING_STATE_FORMAT or not isinstance(counters, dict) or not all(
            isinstance(counters.get(k), int) and counters[k] >= 0 for k in ("num_timesteps", "n_updates")):
        raise ValueError(f"{path} has format {meta.get('format')!r} and counters {counters!r}; expected format "
                         f"{TRAINING_STATE_FORMAT!r} with int num_timesteps and n_updates >= 0")
    policy_state = {k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")}
    try:
        model.policy.load_state_dict(policy_state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit this policy (another model or LoRA rank?): {e}") from e
    optimizer = model.policy.optimizer.state_dict()
    params = [p for group in model.policy.optimizer.param_groups for p in group["params"]]
    optimizer["state"] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            if not index.isdigit() or int(index) >= len(params) or (
                    value.dim() and value.shape != params[int(index)].shape):
                raise ValueError(f"{path}: optimizer entry {key!r} {tuple(value.shape)} does not fit this optimizer "
                                 f"({len(params)} parameters); expected the settings it was saved with")
            optimizer["state"].setdefault(int(index), {})[name] = value
    model.policy.optimizer.load_state_dict(optimizer)
    model.num_timesteps, model._n_updates = counters["num_timesteps"], counters["n_updates"]
