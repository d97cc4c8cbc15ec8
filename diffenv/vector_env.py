"""The native, on-device vector env of `DiffusionSteer-v0` (specification: `diffenv.env`).

Every sub-env's state is a row of a few torch tensors on `device`; a step is one batched network call
plus the sampler's transition maths, with no Python loop over sub-envs. Observations, rewards and
flags are returned as torch tensors on `device`.

No host syncs in the common case. Collection, `generate` and any loop that starts from a full reset step
every sub-env together ("lockstep"); the env then knows every sub-env's step index on the host
(`_lockstep`) and decides each branch of `step` from it, never from a device tensor: a step in noise or
latent mode enqueues its work and returns without waiting for the device. Validation (finite actions,
finite model outputs, the rewards' checks) is recorded on the device as it happens and read once, at the
episode's last step (two syncs: the env's inputs, then the rewards). Anything else, i.e. sub-envs reset
separately, runs the general masked path, which reads its masks from the device (a few syncs per step) and
checks every step. Docs: docs/design.md §1.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from diffenv.config import ONE_STEP_MODES, EnvConfig
from diffenv.episode_checks import EpisodeChecks, check_action_kind, non_finite_actions
from diffenv.models import load_backend, nfe_per_step
from diffenv.samplers import make_sampler
from diffenv.validation import check_seed
from rewards.base import deferred_checks

_AUTORESET = {m.name.lower(): m for m in AutoresetMode}


def _autoreset_mode(mode: str | AutoresetMode) -> AutoresetMode:
    if isinstance(mode, AutoresetMode):
        return mode
    key = str(mode).lower()
    if key not in _AUTORESET:
        raise ValueError(f"autoreset_mode must be one of {sorted(_AUTORESET)} or an AutoresetMode, got {mode!r}")
    return _AUTORESET[key]


class DiffusionSteerVectorEnv(VectorEnv):
    """`num_envs` denoising episodes stepped together; see `diffenv.env.DiffusionSteerEnv` for the MDP.

    Extra arguments beyond the single env's: ``num_envs`` and ``autoreset_mode`` (``"next_step"``
    default, ``"same_step"``, ``"disabled"``; with ``"disabled"`` reset finished sub-envs with
    ``reset(options={"reset_mask": mask})``).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
                 max_episode_steps: int | None = None, **kwargs: Any):
        cfg = EnvConfig(**kwargs)
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        if num_envs % cfg.group_size:
            raise ValueError(
                f"num_envs={num_envs} is not divisible by group_size={cfg.group_size}; "
                f"expected a multiple of {cfg.group_size}"
            )
        self.cfg = cfg
        self.num_envs = int(num_envs)
        self.device = torch.device(cfg.device)
        self.backend = load_backend(cfg.model, device=self.device, **(cfg.model_kwargs or {}))
        cfg.check_against(self.backend)
        self.sampler = make_sampler(
            cfg.sampler_name(self.backend.family), self.backend.scheduler_config, cfg.num_steps,
            family=self.backend.family, eta=cfg.eta, noise_level=cfg.noise_level, device=self.device,
            **self.backend.sampler_kwargs(cfg.num_steps),
        )
        self.reward_fn = cfg.make_reward(self.device, self.backend)
        self.condition_set = torch.as_tensor(cfg.condition_ids(self.backend), device=self.device)
        self.episode_length = 1 if cfg.action_mode in ONE_STEP_MODES else cfg.num_steps
        if max_episode_steps is not None and max_episode_steps < self.episode_length:
            raise ValueError(
                f"max_episode_steps={max_episode_steps} would truncate episodes that last exactly "
                f"{self.episode_length} steps; expected None or >= {self.episode_length}"
            )
        self.metadata = {**self.metadata, "autoreset_mode": _autoreset_mode(autoreset_mode)}
        self.autoreset_mode = self.metadata["autoreset_mode"]
        self.nfe_per_step = nfe_per_step(cfg.guidance_scale)

        shape = tuple(self.backend.latent_shape)
        self.single_observation_space = spaces.Dict({
            "latent": spaces.Box(-np.inf, np.inf, shape, np.float32),
            "timestep": spaces.Box(0.0, 1.0, (1,), np.float32),
            "condition": spaces.Discrete(self.backend.n_conditions),
        })
        bound = np.inf if cfg.action_mode == "latent" else cfg.action_bound
        self.single_action_space = spaces.Box(-bound, bound, shape, np.float32)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        n, dev = self.num_envs, self.device
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(cfg.seed if cfg.seed is not None else secrets.randbits(63))
        self.latents = torch.zeros((n, *shape), device=dev)  # [N, C, H, W]
        self.step_index = torch.zeros(n, dtype=torch.long, device=dev)  # [N], k in 0..K
        self.conditions = torch.zeros(n, dtype=torch.long, device=dev)  # [N]
        self.nfe = torch.zeros(n, dtype=torch.long, device=dev)  # [N], this episode
        self._needs_reset = torch.zeros(n, dtype=torch.bool, device=dev)
        self._cached_output: torch.Tensor | None = None  # model output at the current latents
        self._prompts: np.ndarray | None = None  # [N] str: prompt texts of `conditions` (text-to-image models)
        self._last_dense = torch.zeros(n, device=dev)  # R(x̂0) at the current latents (dense reward)
        self._started = False
        self._lockstep: int | None = None  # the step index all sub-envs share, known on the host; None: may differ
        self.group_ids = torch.arange(n, device=dev) // cfg.group_size  # [N] group id of each sub-env
        self._checks = EpisodeChecks(n, shape, dev)

    @property
    def started(self) -> bool:
        """Whether the first (full) reset has happened: `step` and partial resets need one."""
        return self._started

    # ------------------------------------------------------------------ reset
    @torch.no_grad()  # the env is a simulator: policies compute their own gradients
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:  # one generator drives all sub-envs
            self.generator.manual_seed(check_seed(seed))
        options = dict(options or {})
        self._lockstep = None  # until this reset has succeeded
        mask, full = self._reset_mask(options.pop("reset_mask", None))
        conditions = options.pop("conditions", None)
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; expected 'reset_mask' and/or 'conditions'")
        self._reset_rows(mask, full, conditions)
        self._started = True
        self._lockstep = 0 if full else None
        return self._observation(), self._info()

    def _reset_mask(self, mask) -> tuple[torch.Tensor, bool]:
        """The rows to reset [N] bool, and whether that is all of them (reset may sync; step may not)."""
        if mask is None:
            return torch.ones(self.num_envs, dtype=torch.bool, device=self.device), True
        mask = torch.as_tensor(mask, device=self.device)
        if mask.dtype != torch.bool or mask.shape != (self.num_envs,):
            raise ValueError(
                f"reset_mask must be a bool array of shape ({self.num_envs},), got {mask.dtype} {tuple(mask.shape)}"
            )
        grouped = mask.view(-1, self.cfg.group_size)
        if not (grouped.all(1) | ~grouped.any(1)).all():
            raise ValueError(f"reset_mask must reset whole groups of group_size={self.cfg.group_size} sub-envs")
        full = bool(mask.all())
        if not self._started and not full:
            raise ValueError("the first reset must reset every sub-env; got a partial reset_mask")
        return mask, full

    def _draw_conditions(self, conditions) -> torch.Tensor:
        n_groups = self.num_envs // self.cfg.group_size
        if conditions is None:
            pick = torch.randint(len(self.condition_set), (n_groups,), generator=self.generator, device=self.device)
            return self.condition_set[pick].repeat_interleave(self.cfg.group_size)
        try:
            c = torch.as_tensor(conditions, device=self.device)
        except (TypeError, ValueError, RuntimeError):  # strings, ragged lists, objects
            c = None
        if c is None or c.dtype.is_floating_point or c.dtype == torch.bool or c.shape != (self.num_envs,):
            got = f"{c.dtype} {tuple(c.shape)}" if c is not None else repr(conditions)[:80]
            raise ValueError(f"reset option conditions must be ints of shape ({self.num_envs},), got {got}")
        bad = c[~torch.isin(c, self.condition_set)]
        if len(bad):
            raise ValueError(
                f"conditions {sorted(set(bad.tolist()))[:10]} are not in this env's condition set "
                f"{_summary(self.condition_set.tolist())}; select them with the env's `conditions` argument"
            )
        if not (c.view(-1, self.cfg.group_size) == c.view(-1, self.cfg.group_size)[:, :1]).all():
            raise ValueError(f"conditions must be equal within each group of group_size={self.cfg.group_size}")
        return c.long()

    def _draw_initial_noise(self) -> torch.Tensor:
        shape = tuple(self.backend.latent_shape)
        if self.cfg.share_noise:
            n_groups = self.num_envs // self.cfg.group_size
            x = torch.randn((n_groups, *shape), generator=self.generator, device=self.device)
            return x.repeat_interleave(self.cfg.group_size, dim=0)
        return torch.randn((self.num_envs, *shape), generator=self.generator, device=self.device)

    def _reset_rows(self, mask: torch.Tensor, full: bool, conditions=None) -> None:
        """Start new episodes at the rows of `mask` [N] bool; `full`: the caller knows that is every row."""
        cond, x_T = self._draw_conditions(conditions), self._draw_initial_noise()
        self._checks.clear(None if full else mask)
        if full:
            self.conditions, self.latents = cond, x_T
        else:
            self.conditions = torch.where(mask, cond, self.conditions)
            self.latents = torch.where(mask.view(-1, 1, 1, 1), x_T, self.latents)
        self.step_index = self.step_index.masked_fill(mask, 0)
        self.nfe = self.nfe.masked_fill(mask, 0)
        self._needs_reset = self._needs_reset & ~mask
        self._cached_output = None
        self._prompts = None  # the prompt texts are read again, once, at the next info
        if self.cfg.dense_reward:
            out = self._predict(self.latents, self.step_index)
            self.nfe = self.nfe + mask * self.nfe_per_step
            self._cached_output = out if full and self.cfg.action_mode == "noise" else None
            x0_hat = self.sampler.pred_original_sample(self.latents, out, self.step_index)
            r = self._score(x0_hat)[0]
            self._last_dense = torch.where(mask, r, self._last_dense)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, actions):
        if not self._started:
            raise RuntimeError("step() called before reset(); call env.reset() first")
        actions, finite = self._check_actions(actions)
        # In lockstep `lock` decides every branch on the host; otherwise each branch reads a mask (one sync).
        lock, self._lockstep = self._lockstep, None  # back to the general path if this step raises
        n, length, info = self.num_envs, self.episode_length, {}
        resetting = self._needs_reset.clone()  # NEXT_STEP autoreset: these sub-envs ignore the action and start over
        some_reset, full_reset = self._some_all(
            resetting, None if lock is None else lock == length and self.autoreset_mode is AutoresetMode.NEXT_STEP)
        if some_reset:
            self._reset_rows(resetting, full_reset)
        if finite is not None:  # after the autoreset, so that the new episode answers for its action
            self._checks.record_actions(finite, self.step_index)
        if self.autoreset_mode is AutoresetMode.DISABLED:
            done = self.step_index >= length
            if lock == length if lock is not None else bool(done.any()):
                raise RuntimeError(
                    f"sub-envs {done.nonzero().flatten().tolist()} already terminated; with autoreset_mode=DISABLED "
                    "call reset(options={'reset_mask': mask}) before stepping them"
                )
        active = ~resetting
        if self.cfg.action_mode == "initial_noise":
            self._run_sampler(actions, active)
        elif self.cfg.action_mode == "trajectory":
            info["trajectory"] = self._run_sampler(self.latents, active, stochastic=True)
        else:
            self._transition(actions, active)
        terminated = active & (self.step_index >= length)
        lock = 0 if full_reset else None if lock is None else lock + 1  # no sub-env stepped, or every one did
        some_end, all_end = self._some_all(terminated, None if lock is None else lock == length)
        if self.autoreset_mode is AutoresetMode.NEXT_STEP:
            self._needs_reset = terminated
        read_checks = self.cfg.validate and (lock is None or all_end)  # lockstep: once, at the episode's end
        if read_checks:  # before the reward, so that a NaN model output is not reported as a NaN reward
            self._checks.raise_inputs(self._non_finite_output)
        if some_end or self.cfg.dense_reward:
            reward = self._rewards(active, terminated, info, some_end, all_end)
        else:
            reward = torch.zeros(n, device=self.device)
        if read_checks:
            self._checks.raise_rewards()
        obs = self._observation()
        if self.autoreset_mode is AutoresetMode.SAME_STEP and some_end:
            info["final_obs"], info["_final_obs"] = obs, terminated
            self._reset_rows(terminated, all_end)
            lock = 0 if all_end else None
            obs = self._observation()
        info.update(self._info())
        self._lockstep = lock
        return obs, reward, terminated, torch.zeros_like(terminated), info

    def _some_all(self, mask: torch.Tensor, known: bool | None) -> tuple[bool, bool]:
        """Whether some / all rows of `mask` [N] bool are set: `known` in lockstep (all rows or none, decided on
        the host), else read from the device (one host sync)."""
        if known is not None:
            return known, known
        count = int(mask.sum())
        return count > 0, count == self.num_envs

    def _check_actions(self, actions) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The actions as float32 on `device`, and which rows are finite [N] bool (None: checked already, or
        `validate=False`).

        Why two timings: a numpy array is in host memory, so checking it costs no sync and a non-finite value
        raises at once, before it touches the state; a tensor may live on an accelerator, where raising at once
        would stall every step, so its check is recorded and read at the episode's end (`EpisodeChecks`).
        """
        expected = (self.num_envs, *self.backend.latent_shape)
        if not isinstance(actions, (torch.Tensor, np.ndarray)):
            raise TypeError(f"actions must be a torch.Tensor or numpy array of shape {expected}, got {type(actions).__name__}")
        check_action_kind(actions, "actions")
        on_host = isinstance(actions, np.ndarray)
        a = torch.as_tensor(actions, device=None if on_host else self.device)
        if tuple(a.shape) != expected:
            raise ValueError(f"actions have shape {tuple(a.shape)}; expected {expected} (num_envs, *latent_shape)")
        a = a.float()  # before the check: a float64 value beyond float32's range becomes inf here
        finite = torch.isfinite(a).flatten(1).all(1) if self.cfg.validate else None  # [N]
        if on_host and finite is not None:
            if not finite.all():
                raise ValueError(non_finite_actions((~finite).nonzero().flatten().tolist()))
            finite = None
        a = a.to(self.device)
        if self.cfg.action_mode != "latent" and np.isfinite(self.cfg.action_bound):
            a = a.clamp(-self.cfg.action_bound, self.cfg.action_bound)
        return a, finite

    def _predict(self, latents: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        t = self.sampler.model_timesteps[step_index.clamp(max=self.cfg.num_steps - 1)]
        out = self.backend.predict(latents, t, self.conditions, self.cfg.guidance_scale)
        if self.cfg.validate:
            self._checks.record_output(out, latents, step_index)
        return out

    def check(self) -> None:
        """Raise now any error that validation has recorded for the current episodes: a non-finite action, a
        NaN/inf model output, a failed reward check (two host syncs). `step` does this at each episode's end
        (every step on the general path); call it to fail sooner."""
        self._checks.raise_inputs(self._non_finite_output)
        self._checks.raise_rewards()

    def _non_finite_output(self, output_step: torch.Tensor, inputs: torch.Tensor) -> str:
        """Where a NaN/inf model output comes from (the latent, the guidance or the model), so it is not
        reported later as a NaN reward. `output_step` [N]: each row's first step with a NaN/inf output (−1:
        none); `inputs` [N, C, H, W]: the latent that step's network call saw."""
        k = int(output_step[output_step >= 0].min())
        rows = (output_step == k).nonzero().flatten()
        where = f"the model output is NaN/inf at denoising step {k} (sub-envs {rows[:8].tolist()})"
        bad, w = inputs[rows], self.cfg.guidance_scale
        t = self.sampler.model_timesteps[output_step[rows].clamp(max=self.cfg.num_steps - 1)]
        amplified = f", or guidance_scale={w:g} amplifying the model output" if w != 1.0 else ""
        if not bool(torch.isfinite(bad).all()):
            return f"{where}: its input latent is already NaN/inf (from actions that overflow{amplified})"
        size = bad.abs().amax().item()
        if size > 1e4:  # latents are O(1) (x_T ~ N(0, I)); this size only comes from huge actions or guidance
            return (f"{where}: its input latent is far out of range (max |x| = {size:.3g}), "
                    f"from actions that large{amplified}")
        if w != 1.0 and bool(torch.isfinite(self.backend.predict(bad, t, self.conditions[rows], 1.0)).all()):
            return (f"{where}: classifier-free guidance with guidance_scale={w:g} overflows "
                    "(the unguided output is finite)")
        return f"{where} for an in-range latent: the model's weights (or its LoRA) hold NaN/inf, or it overflows"

    def _transition(self, actions: torch.Tensor, active: torch.Tensor) -> None:
        k = self.step_index
        if self.cfg.action_mode == "latent":
            new = actions  # the `where` below copies: the state never aliases a tensor the caller may modify
        else:  # noise: one step of the frozen base sampler, driven by the action
            out = self._cached_output if self._cached_output is not None else self._predict(self.latents, k)
            self.nfe = self.nfe + active * self.nfe_per_step * (self._cached_output is None)
            mean, std = self.sampler.step_distribution(self.latents, out, k.clamp(max=self.cfg.num_steps - 1))
            new = mean + std.view(-1, 1, 1, 1) * actions
        self._cached_output = None
        if self.cfg.fork_at is not None:  # the group follows its first member's trajectory until fork_at
            grouped = new.view(-1, self.cfg.group_size, *new.shape[1:])  # [N/G, G, C, H, W]
            leader = grouped[:, :1].expand_as(grouped).reshape(new.shape)
            new = torch.where((k < self.cfg.fork_at).view(-1, 1, 1, 1), leader, new)
        self.latents = torch.where(active.view(-1, 1, 1, 1), new, self.latents)
        self.step_index = self.step_index + active

    def _run_sampler(self, x: torch.Tensor, active: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
        """The whole K-step sampler from x_T = `x` in one env step; returns the visited latents [N, K+1, ...].

        initial_noise: the deterministic sampler (std is 0). trajectory: the env's (stochastic) sampler
        with noise from the env's seeded generator, the model being whatever `model` the agent supplied.
        """
        visited = [x]
        for k in range(self.cfg.num_steps):
            idx = torch.full((self.num_envs,), k, dtype=torch.long, device=self.device)
            mean, std = self.sampler.step_distribution(x, self._predict(x, idx), idx)
            if stochastic:
                noise = torch.randn(mean.shape, generator=self.generator, device=self.device)
                x = mean + std.view(-1, 1, 1, 1) * noise
            else:
                x = mean
            visited.append(x)
        self.latents = torch.where(active.view(-1, 1, 1, 1), x, self.latents)
        self.nfe = self.nfe + active * self.nfe_per_step * self.cfg.num_steps
        self.step_index = self.step_index + active
        return torch.stack(visited, 1)

    # ------------------------------------------------------------------ reward
    def _score(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        images = self.backend.decode(x0)
        if self.reward_fn is None:
            return torch.zeros(len(x0), device=self.device), images, {}
        with deferred_checks() as checks:  # read at the episode's end (`EpisodeChecks.raise_rewards`), not now
            comps = self.reward_fn.components(images, self.conditions)
            name = self.reward_fn.name
            total = comps[name] if name in comps else self.reward_fn(images, self.conditions)
        if self.cfg.validate:
            self._checks.rewards += checks
        return total.to(self.device, torch.float32), images, comps

    def _rewards(self, active, terminated, info, some_end: bool, all_end: bool) -> torch.Tensor:
        """The step's reward [N]; `some_end`/`all_end`: whether any / every sub-env terminated (host-side)."""
        total, images, comps = self._score(self._current_x0_estimate(active, terminated, all_end))
        if self.cfg.dense_reward:
            reward = torch.where(active, total - self._last_dense, torch.zeros_like(total))
            self._last_dense = torch.where(active, total, self._last_dense)
        else:
            reward = torch.where(terminated, total, torch.zeros_like(total))
        if some_end:
            info["final_images"], info["_final_images"] = images, terminated
            info["reward_components"] = {k: v.to(self.device) for k, v in comps.items()}
            info["_reward_components"] = terminated
        return reward

    def _current_x0_estimate(self, active, terminated, all_end: bool) -> torch.Tensor:
        """x0 at terminated rows; the model's x̂0 at the others (dense reward only; cached for the next step)."""
        if not self.cfg.dense_reward or all_end:
            return self.latents
        out = self._predict(self.latents, self.step_index)
        self._cached_output = out if self.cfg.action_mode == "noise" else None
        # rows reset in this step counted this call at their reset (same latent, same output)
        self.nfe = self.nfe + (active & ~terminated) * self.nfe_per_step
        x0_hat = self.sampler.pred_original_sample(self.latents, out, self.step_index.clamp(max=self.cfg.num_steps - 1))
        return torch.where(terminated.view(-1, 1, 1, 1), self.latents, x0_hat)

    # ------------------------------------------------------------------ views
    # Copies: a caller editing an observation or info tensor in place must not change the env's state.
    def _observation(self) -> dict[str, torch.Tensor]:
        if self.cfg.action_mode in ONE_STEP_MODES:
            t = torch.where(self.step_index > 0, 0.0, 1.0)
        else:
            t = self.sampler.obs_timesteps[self.step_index]
        return {"latent": self.latents.clone(), "timestep": t.view(-1, 1).float(), "condition": self.conditions.clone()}

    def _info(self) -> dict[str, Any]:
        info = {"nfe": self.nfe.clone(), "step_index": self.step_index.clone()}
        if self.backend.text_conditioned:  # the agent sees its prompt: one host read per reset, not per step
            if self._prompts is None:
                names = self.backend.condition_names
                self._prompts = np.array([names[c] for c in self.conditions.tolist()], dtype=str)
            info["prompt"] = self._prompts.copy()
        return info

    def close_extras(self, **kwargs: Any) -> None:
        self._started, self._lockstep = False, None


def _summary(ids: list[int], limit: int = 12) -> str:
    """A condition set for an error message: all ids when few, else the first ones and the count."""
    return str(ids) if len(ids) <= limit else f"[{', '.join(map(str, ids[:limit]))}, ...] ({len(ids)} ids)"
