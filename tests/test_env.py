"""DiffusionSteer-v0: the MDP contract of docs/design.md §1 on the embedded models."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.wrappers import FlattenObservation

import diffenv
from diffenv import DiffusionSteerVectorEnv

K = 4


def make(num_envs=4, **kw):
    kw.setdefault("num_steps", K)
    kw.setdefault("reward", None)
    kw.setdefault("seed", 0)
    return DiffusionSteerVectorEnv(num_envs=num_envs, **kw)


def rollout(env, seed=0, noise_seed=1, conditions=None):
    """Run one episode with ε ~ N(0, I); return (observations, rewards, last info, actions)."""
    obs, _ = env.reset(seed=seed, options=None if conditions is None else {"conditions": conditions})
    gen = torch.Generator().manual_seed(noise_seed)
    observations, rewards, actions = [obs["latent"].clone()], [], []
    for _ in range(env.episode_length):
        a = torch.randn(obs["latent"].shape, generator=gen)
        assert a.abs().max() < env.single_action_space.high.max()  # the default box (±8) never binds: exact sampler
        actions.append(a)
        obs, r, term, trunc, info = env.step(a)
        observations.append(obs["latent"].clone())
        rewards.append(r.clone())
    assert term.all() and not trunc.any()
    return observations, rewards, info, actions


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_noise_mode_reproduces_diffusers_scheduler(sampler, monkeypatch):
    """ε ~ N(0, I) as actions gives exactly the diffusers scheduler's own `step` loop with that noise."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
    from diffusers import DDIMScheduler, DDPMScheduler

    env = make(3, sampler=sampler, eta=1.0)
    observations, _, info, actions = rollout(env)
    backend = env.backend
    sched = (DDIMScheduler if sampler == "ddim" else DDPMScheduler).from_config(backend.scheduler_config)
    sched.set_timesteps(K)
    # diffusers' float32 DDIM loses ~1e-4 to cancellation in sqrt(1 - a_prev - sigma^2) at t = 999; our
    # transitions keep their tables in float64, so the reference runs the scheduler's step in float64
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    if sampler == "ddim":
        sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod).double()
    x, c = observations[0].double(), env.conditions
    for k, t in enumerate(sched.timesteps):
        out = backend.denoiser(x.float(), t, class_labels=c).sample.double()
        if sampler == "ddim":
            x = sched.step(out, t, x, eta=1.0, variance_noise=actions[k].double()).prev_sample
        else:  # DDPMScheduler draws its noise internally: hand it ours
            monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, _e=actions[k].double(), **kw: _e)
            x = sched.step(out, t, x).prev_sample
        torch.testing.assert_close(observations[k + 1], x.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(info["final_images"], backend.decode(x.float()), atol=1e-5, rtol=1e-5)


def test_flow_ode_reproduces_diffusers_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    env = make(2, model="digits-flow", sampler="ode")
    observations, _, _, _ = rollout(env)
    sched = FlowMatchEulerDiscreteScheduler.from_config(env.backend.scheduler_config)
    sched.set_timesteps(K)
    x = observations[0]
    for k, t in enumerate(sched.timesteps):
        out = env.backend.denoiser(x, t.expand(2), class_labels=env.conditions).sample
        x = sched.step(out, t, x).prev_sample
        torch.testing.assert_close(observations[k + 1], x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["digits-eps", "digits-flow"])
def test_latent_mode_with_base_means_gives_the_same_trajectory(model):
    noise_env, latent_env = make(3, model=model), make(3, model=model, action_mode="latent")
    ref, _, _, actions = rollout(noise_env)
    obs, _ = latent_env.reset(seed=0)
    for k in range(K):
        out = latent_env.backend.predict(obs["latent"], latent_env.sampler.model_timesteps[latent_env.step_index],
                                         obs["condition"])
        mean, std = latent_env.sampler.step_distribution(obs["latent"], out, latent_env.step_index)
        obs, *_ , info = latent_env.step(mean + std.view(-1, 1, 1, 1) * actions[k])
        torch.testing.assert_close(obs["latent"], ref[k + 1], atol=0, rtol=0)
    assert (info["nfe"] == 0).all(), "latent mode runs no network"


def test_same_seed_is_bitwise_identical_and_different_seeds_differ():
    a = rollout(make(4, reward="digit_classifier"), seed=3)
    b = rollout(make(4, reward="digit_classifier"), seed=3)
    c = rollout(make(4, reward="digit_classifier"), seed=4)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert torch.equal(a[1][-1], b[1][-1])
    assert torch.equal(a[2]["final_images"], b[2]["final_images"])
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[2]["final_images"], c[2]["final_images"])


def test_check_env_and_flatten_observation_on_single_env():
    env = gym.make("DiffusionSteer-v0", num_steps=3)
    check_env(env.unwrapped, skip_render_check=True)
    flat = FlattenObservation(gym.make("DiffusionSteer-v0", num_steps=3))
    obs, _ = flat.reset(seed=0)
    assert flat.observation_space.contains(obs) and obs.shape == flat.observation_space.shape


def test_single_env_episode_reward_and_info():
    env = gym.make("DiffusionSteer-v0", model="digits-eps", reward="digit_classifier", num_steps=3)
    obs, _ = env.reset(seed=0)
    rewards, terminated = [], False
    while not terminated:
        obs, r, terminated, truncated, info = env.step(env.action_space.sample())
        rewards.append(r)
        assert truncated is False
    assert rewards[:-1] == [0.0, 0.0] and 0.0 <= rewards[-1] <= 1.0
    assert info["nfe"] == 3 and info["final_images"].shape == (1, 8, 8)
    assert info["reward_components"]["digit_classifier"] == pytest.approx(rewards[-1])
    assert 0.0 <= info["final_images"].min() and info["final_images"].max() <= 1.0
    with pytest.raises(RuntimeError, match="reset"):
        env.step(env.action_space.sample())


def test_make_vec_returns_native_env_with_torch_state():
    venv = gym.make_vec("DiffusionSteer-v0", num_envs=6, vectorization_mode="vector_entry_point", num_steps=2,
                        reward="digit_classifier")
    assert isinstance(venv, DiffusionSteerVectorEnv)
    obs, info = venv.reset(seed=0)
    assert obs["latent"].shape == (6, 1, 8, 8) and obs["latent"].dtype == torch.float32
    assert obs["timestep"].shape == (6, 1) and obs["condition"].dtype == torch.int64
    assert obs["latent"].device == venv.device and torch.all(obs["timestep"] <= 1)
    assert venv.observation_space["latent"].shape == (6, 1, 8, 8)
    assert venv.action_space.shape == (6, 1, 8, 8)
    _, r, term, trunc, info = venv.step(torch.randn(6, 1, 8, 8))
    assert r.shape == (6,) and r.dtype == torch.float32 and term.dtype == torch.bool and not term.any()
    _, r, term, _, info = venv.step(torch.randn(6, 1, 8, 8))
    assert term.all() and info["_final_images"].all() and info["final_images"].shape == (6, 1, 8, 8)
    assert (r > 0).all() and torch.equal(info["reward_components"]["digit_classifier"], r)


def test_make_vec_sync_steps_single_envs():
    """gymnasium's own `make_vec(..., vectorization_mode="sync")`: a SyncVectorEnv of numpy single envs."""
    venv = gym.make_vec("DiffusionSteer-v0", num_envs=3, vectorization_mode="sync", num_steps=2,
                        model="digits-flow", reward="digit_classifier")
    assert isinstance(venv, gym.vector.SyncVectorEnv)
    obs, _ = venv.reset(seed=0)
    assert obs["latent"].shape == (3, 1, 8, 8) and obs["latent"].dtype == np.float32
    for _ in range(2):
        obs, r, term, trunc, info = venv.step(venv.action_space.sample())
    assert term.all() and not trunc.any() and r.shape == (3,) and ((0 <= r) & (r <= 1)).all()
    venv.close()


def test_autoreset_next_step():
    env = make(2, num_steps=2)
    _, _, info, _ = rollout(env)
    obs, r, term, _, info = env.step(torch.zeros(2, 1, 8, 8))  # the autoreset step: action ignored
    assert not term.any() and (r == 0).all() and (info["step_index"] == 0).all() and (info["nfe"] == 0).all()
    assert torch.all(obs["timestep"] == env.sampler.obs_timesteps[0])


def test_autoreset_same_step():
    env = make(2, num_steps=2, autoreset_mode="same_step")
    env.reset(seed=0)
    env.step(torch.zeros(2, 1, 8, 8))
    obs, r, term, _, info = env.step(torch.zeros(2, 1, 8, 8))
    assert term.all() and info["_final_obs"].all()
    assert torch.all(info["final_obs"]["timestep"] == 0)  # the terminal observation, t = 0
    assert torch.all(obs["timestep"] == env.sampler.obs_timesteps[0])  # already the next episode
    assert not torch.equal(obs["latent"], info["final_obs"]["latent"])


def test_autoreset_disabled_with_reset_mask():
    env = make(4, num_steps=1, autoreset_mode="disabled", group_size=2)
    env.reset(seed=0)
    env.step(torch.zeros(4, 1, 8, 8))
    with pytest.raises(RuntimeError, match="reset_mask"):
        env.step(torch.zeros(4, 1, 8, 8))
    mask = torch.tensor([True, True, False, False])
    obs, info = env.reset(options={"reset_mask": mask})
    assert info["step_index"].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="whole groups"):
        env.reset(options={"reset_mask": torch.tensor([True, False, False, False])})


def test_guidance_doubles_nfe_and_changes_images():
    plain, cfg = make(2, num_steps=3), make(2, num_steps=3, guidance_scale=3.0)
    _, _, info_plain, _ = rollout(plain)
    _, _, info_cfg, _ = rollout(cfg)
    assert info_plain["nfe"].tolist() == [3, 3] and info_cfg["nfe"].tolist() == [6, 6]
    assert not torch.allclose(info_plain["final_images"], info_cfg["final_images"])


def test_group_size_and_share_noise():
    env = make(8, group_size=4)
    obs, _ = env.reset(seed=0)
    c = obs["condition"].view(2, 4)
    assert (c == c[:, :1]).all()
    assert not torch.equal(obs["latent"][0], obs["latent"][1]), "without share_noise each x_T is drawn"
    shared = make(8, group_size=4, share_noise=True)
    x = shared.reset(seed=0)[0]["latent"].view(2, 4, -1)
    assert (x == x[:, :1]).all() and not torch.equal(x[0, 0], x[1, 0])


def test_fork_at_branches_after_k():
    env = make(4, group_size=2, fork_at=2)
    observations, *_ = rollout(env)
    for k, x in enumerate(observations):
        pairs = x.view(2, 2, -1)
        same = torch.equal(pairs[:, 0], pairs[:, 1])
        assert same == (k <= 2), f"step {k}: group members should {'share' if k <= 2 else 'differ in'} latents"


def test_dense_reward_telescopes_to_terminal_reward():
    sparse = make(4, reward="digit_classifier")
    dense = make(4, reward="digit_classifier", dense_reward=True)
    _, r_sparse, info_s, _ = rollout(sparse)
    _, r_dense, info_d, _ = rollout(dense)
    assert torch.equal(info_s["final_images"], info_d["final_images"])
    # sum of shaped rewards = R(x0) - R(x̂0 at reset)
    dense.reset(seed=0)
    out = dense.backend.predict(dense.latents, dense.sampler.model_timesteps[dense.step_index], dense.conditions)
    r0 = dense.reward_fn(dense.backend.decode(dense.sampler.pred_original_sample(dense.latents, out, dense.step_index)),
                         dense.conditions)
    torch.testing.assert_close(torch.stack(r_dense).sum(0), r_sparse[-1] - r0, atol=1e-5, rtol=0)
    assert info_d["nfe"].tolist() == info_s["nfe"].tolist(), "dense shaping reuses its network calls in noise mode"


def test_initial_noise_mode_runs_the_ode_sampler():
    env = make(3, action_mode="initial_noise", reward="digit_classifier")
    obs, _ = env.reset(seed=0)
    assert torch.all(obs["timestep"] == 1.0)
    _, r, term, _, info = env.step(obs["latent"])
    assert term.all() and info["nfe"].tolist() == [K] * 3
    ode = make(3, sampler="ode", reward="digit_classifier")
    _, r_ode, info_ode, _ = rollout(ode)
    torch.testing.assert_close(info["final_images"], info_ode["final_images"], atol=1e-6, rtol=0)
    torch.testing.assert_close(r, r_ode[-1], atol=1e-6, rtol=0)


def test_action_bound_clamps_noise():
    env = make(2, action_bound=1.0)
    assert env.single_action_space.high.max() == 1.0
    ref = make(2)
    env.reset(seed=0), ref.reset(seed=0)
    a = torch.full((2, 1, 8, 8), 5.0)
    assert torch.equal(env.step(a)[0]["latent"], ref.step(a.clamp(-1, 1))[0]["latent"])


def test_default_action_box_is_finite_and_far_in_the_gaussian_tail():
    """SB3 needs a finite box; the default ±8 leaves ε ~ N(0, I) unclamped (see `diffenv.env`'s table)."""
    assert math.erfc(8 / math.sqrt(2)) < 1.3e-15  # P(|ε_i| > 8)
    for mode in ("noise", "initial_noise", "trajectory"):
        space = make(2, action_mode=mode).single_action_space
        assert (space.low == -8.0).all() and (space.high == 8.0).all(), mode
    assert gym.make("DiffusionSteer-v0", num_steps=3).action_space == gym.spaces.Box(-8, 8, (1, 8, 8), np.float32)
    assert np.isinf(make(2, action_mode="latent").single_action_space.high).all()  # latents are not noise
    assert np.isinf(make(2, action_bound=math.inf).single_action_space.high).all()  # no box, on request


def test_reset_options_fix_conditions():
    env = make(4, conditions=[3, 7])
    for _ in range(3):
        obs, _ = env.reset()
        assert set(obs["condition"].tolist()) <= {3, 7}
    obs, _ = env.reset(options={"conditions": [7, 7, 3, 3]})
    assert obs["condition"].tolist() == [7, 7, 3, 3]
    with pytest.raises(ValueError, match="condition set"):
        env.reset(options={"conditions": [1, 1, 1, 1]})


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(model="digits-epz"), ValueError, "did you mean 'digits-eps'"),
        (dict(reward="digit_clasifier"), ValueError, "digit_classifier"),
        (dict(sampler="euler"), ValueError, "unknown sampler 'euler'"),
        (dict(model="digits-flow", sampler="ddim"), ValueError, "flow_sde"),
        (dict(action_mode="pixels"), ValueError, r"action_mode='pixels': expected one of \('noise'"),
        (dict(num_envs=6, group_size=4), ValueError, "not divisible by group_size=4"),
        (dict(num_steps=0), ValueError, "num_steps=0: expected an int >= 1"),
        (dict(guidance_scale=-1.0), ValueError, "guidance_scale=-1.0: expected a float >= 0"),
        (dict(conditions=[3, 10]), ValueError, r"conditions \[10\] out of range; expected ids in 0..9"),
        (dict(action_mode="initial_noise", sampler="ddim"), ValueError, "deterministic"),
        (dict(autoreset_mode="sometimes"), ValueError, "autoreset_mode"),
    ],
)
def test_bad_constructor_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        make(**{"num_envs": 4, **kwargs})


def test_bad_actions_and_step_before_reset():
    env = make(2)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(torch.zeros(2, 1, 8, 8))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2, 8, 8\); expected \(2, 1, 8, 8\)"):
        env.step(torch.zeros(2, 8, 8))
    bad = torch.zeros(2, 1, 8, 8)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf \(sub-envs \[1\]\)"):
        env.step(bad.numpy())  # host memory: checked at once, before the state changes
    with pytest.raises(ValueError, match=r"NaN or inf \(sub-envs \[1\]\).*\(first at step 1;"):
        env.step(torch.zeros(2, 1, 8, 8))
        for _ in range(env.episode_length - 1):  # a tensor is checked without a host sync, at the episode's end
            env.step(bad)
    with pytest.raises(TypeError, match="floating point"):
        env.step(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    single = gym.make("DiffusionSteer-v0", num_steps=2)
    with pytest.raises(RuntimeError, match="before reset"):
        single.unwrapped.step(np.zeros((1, 8, 8), np.float32))
    single.reset(seed=0)
    with pytest.raises(ValueError, match="expected \\(1, 8, 8\\)"):
        single.step(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        single.step(np.full((1, 8, 8), np.inf, np.float32))


@pytest.mark.parametrize("vector", [False, True])
def test_misused_reset_and_step_name_the_argument(vector):
    """Seeds out of range, a condition of the wrong type, meta-device and object-dtype actions: one message naming
    the argument and what it expects (not torch's "Overflow when unpacking long long" or "too many dimensions")."""
    env = make(1) if vector else gym.make("DiffusionSteer-v0", num_steps=2)
    key = "actions" if vector else "action"
    env.reset(seed=0)  # (gymnasium's passive checker needs a first reset that succeeded)
    with pytest.raises(ValueError, match=r"seed=1180591620717411303424: expected an int in \[0, 2\*\*63 - 1\]"):
        env.reset(seed=2**70)
    with pytest.raises(ValueError, match=r"seed=-1: expected an int in \[0, 2\*\*63 - 1\]"):
        env.reset(seed=-1)
    with pytest.raises(TypeError, match=r"seed=1.5 is a float; expected an int"):
        env.reset(seed=1.5)
    if vector:
        with pytest.raises(ValueError, match=r"reset option conditions must be ints of shape \(1,\), got \['a'\]"):
            env.reset(options={"conditions": ["a"]})
    else:
        with pytest.raises(TypeError, match=r"reset option condition='a' is a str; expected an int condition id"):
            env.reset(options={"condition": "a"})
    env.reset(seed=0)
    shape = env.action_space.shape
    with pytest.raises(ValueError, match=rf"^{key}: a tensor on the meta device \(a shape without values\)"):
        env.step(torch.zeros(shape, device="meta"))
    with pytest.raises(TypeError, match=rf"^{key}: dtype object; expected floating point values"):
        env.step(np.zeros(shape, dtype=object))
    env.step(np.zeros(shape, dtype=np.float32))  # the env is unharmed


def test_env_is_registered_on_import():
    assert diffenv.ENV_ID in gym.registry
    spec = gym.spec("DiffusionSteer-v0")
    assert spec.vector_entry_point == "diffenv.vector_env:DiffusionSteerVectorEnv"


@pytest.mark.parametrize("model", ["digits-eps", "digits-flow"])
def test_trajectory_mode_runs_the_stochastic_sampler_in_one_step(model):
    traj = make(3, model=model, action_mode="trajectory", reward="digit_classifier")
    obs, _ = traj.reset(seed=0)
    x_T = obs["latent"].clone()
    _, r, term, _, info = traj.step(torch.zeros(3, 1, 8, 8))  # the action is ignored
    assert term.all() and info["nfe"].tolist() == [K] * 3 and info["trajectory"].shape == (3, K + 1, 1, 8, 8)
    assert torch.equal(info["trajectory"][:, 0], x_T)
    # the same draws through noise mode: the env's generator continues after x_T
    noise = make(3, model=model, reward="digit_classifier")
    obs, _ = noise.reset(seed=0)
    gen = torch.Generator().set_state(noise.generator.get_state())
    for k in range(K):
        obs, r_noise, *_, info_noise = noise.step(torch.randn(obs["latent"].shape, generator=gen))
        torch.testing.assert_close(obs["latent"], info["trajectory"][:, k + 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(r, r_noise, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multi-step"):
        make(2, action_mode="trajectory", dense_reward=True)


@pytest.mark.parametrize("autoreset_mode", ["next_step", "same_step"])
def test_observations_and_info_do_not_alias_env_state(autoreset_mode):
    """Editing what reset/step returned, in place, must not change the env (vector and single env)."""
    edited, reference = make(4, autoreset_mode=autoreset_mode), make(4, autoreset_mode=autoreset_mode)
    out, ref = edited.reset(seed=3), reference.reset(seed=3)
    actions = torch.randn(K + 2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for a in actions:  # past the end of an episode: autoreset and same_step's final_obs too
        obs, info = out[0], out[-1]
        for tensor in (*obs.values(), *info.values(), *info.get("final_obs", {}).values()):
            if isinstance(tensor, torch.Tensor):
                tensor.fill_(7)  # latents, condition ids and step counters alike
        out, ref = edited.step(a), reference.step(a)
        for key in ("latent", "timestep", "condition"):
            assert torch.equal(out[0][key], ref[0][key]), key
        assert torch.equal(out[-1]["nfe"], ref[-1]["nfe"]) and torch.equal(out[-1]["step_index"], ref[-1]["step_index"])

    single, single_ref = (gym.make("DiffusionSteer-v0", num_steps=K, reward=None) for _ in range(2))
    obs, _ = single.reset(seed=5)
    obs_ref, _ = single_ref.reset(seed=5)
    for _ in range(K):
        obs["latent"][...] = 7
        obs, obs_ref = single.step(np.zeros((1, 8, 8), np.float32))[0], single_ref.step(np.zeros((1, 8, 8), np.float32))[0]
        np.testing.assert_array_equal(obs["latent"], obs_ref["latent"])


@pytest.mark.parametrize("kw, action, expected", [
    (dict(guidance_scale=1e30), 0.0,
     r"step 1 .*: its input latent is far out of range \(max \|x\| = .*\), from actions that large, "
     r"or guidance_scale=1e\+30 amplifying the model output"),
    (dict(guidance_scale=1e39), 0.0, r"step 0 .*: classifier-free guidance with guidance_scale=1e\+39 overflows"),
    (dict(action_bound=math.inf), 1e30,
     r"step 1 \(sub-envs \[0, 1, 2, 3\]\): its input latent is far out of range \(max \|x\| = .*e\+\d\d\), "
     r"from actions that large$"),
    (dict(action_bound=math.inf, action_mode="initial_noise"), 1e30, r"step 0 .*far out of range"),
    (dict(nan_weights=True), 0.0,
     r"step 0 .* for an in-range latent: the model's weights \(or its LoRA\) hold NaN/inf"),
])
def test_non_finite_model_output_names_its_source_not_the_reward(kw, action, expected):
    kw = dict(kw)
    nan_weights = kw.pop("nan_weights", False)
    env = make(4, model="digits-flow", reward="digit_classifier", **kw)
    if nan_weights:
        with torch.no_grad():
            next(env.backend.denoiser.parameters()).view(-1)[0] = float("nan")
    env.reset()
    with pytest.raises(ValueError, match=expected) as err:
        for _ in range(env.episode_length):
            env.step(torch.full((4, 1, 8, 8), action))
    assert "the model output is NaN/inf" in str(err.value) and "reward" not in str(err.value)
