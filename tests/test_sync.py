"""The vector step waits for the device only at an episode's end (docs/design.md §1).

In lockstep (every sub-env stepped together from a full reset, as in collection and `generate`) a step in
noise or latent mode must not read a value back from the device: on a GPU each read stalls the pipeline.
Counted on the CPU with `host_syncs.count_host_syncs` (every op that would sync on an accelerator), and on
CUDA, where there is one, with `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import pytest
import torch
from host_syncs import count_host_syncs

from diffenv import DiffusionSteerEnv, DiffusionSteerVectorEnv

K = 3
EPISODES = 2
#: the terminal steps of `EPISODES` episodes under NEXT_STEP autoreset (step K of each is the autoreset step)
ENDS = {e * (K + 1) + K - 1 for e in range(EPISODES)}
CASES = {
    "noise": {},
    "latent": dict(action_mode="latent"),
    "noise-cfg-fork": dict(guidance_scale=3.0, group_size=2, fork_at=1),
    "noise-dense": dict(dense_reward=True),
    "latent-dense-flow": dict(action_mode="latent", dense_reward=True, model="digits-flow"),
    "noise-same-step": dict(autoreset_mode="same_step"),
}
#: the same without the autoreset step (same_step resets inside the terminal step)
ENDS_SAME_STEP = {e * K + K - 1 for e in range(EPISODES)}


def make(device="cpu", **kw):
    kw.setdefault("reward", "digit_classifier")
    return DiffusionSteerVectorEnv(num_envs=4, num_steps=K, seed=0, device=device, **kw)


def actions(env, n_steps, seed=1):
    gen = torch.Generator(device=env.device).manual_seed(seed)
    return [torch.randn((env.num_envs, *env.backend.latent_shape), generator=gen, device=env.device)
            for _ in range(n_steps)]


@pytest.mark.parametrize("case", CASES)
def test_lockstep_step_syncs_only_at_the_episode_end(case):
    env = make(**CASES[case])
    ends = ENDS_SAME_STEP if "autoreset_mode" in CASES[case] else ENDS
    env.reset(seed=0)
    counts = []
    for action in actions(env, max(ends) + 2):
        with count_host_syncs() as counter:
            _, _, terminated, _, _ = env.step(action)
        counts.append(counter.count)
    assert {i for i, c in enumerate(counts) if c} <= ends, f"host syncs per step: {counts}"
    assert all(counts[i] <= 2 for i in ends), f"at an episode's end: the inputs' check and the rewards'; {counts}"


def test_validate_false_never_syncs():
    env = make(validate=False, dense_reward=True)
    env.reset(seed=0)
    with count_host_syncs() as counter:
        for action in actions(env, 2 * (K + 1)):
            env.step(action)
    assert counter.count == 0, counter.ops


@pytest.mark.parametrize("kw", [{}, dict(dense_reward=True), dict(autoreset_mode="same_step"),
                                dict(action_mode="latent", group_size=2, fork_at=1)])
def test_general_masked_path_matches_lockstep(kw):
    """Forced off lockstep (as after a partial reset), the env reads its masks from the device and must give
    exactly what the lockstep path gives."""
    fast, general = make(**kw), make(**kw)
    fast.reset(seed=3), general.reset(seed=3)
    for i, action in enumerate(actions(fast, 2 * (K + 1) + 1)):
        general._lockstep = None  # the bookkeeping under test: what a partial reset leaves
        a, b = fast.step(action), general.step(action)
        for key in ("latent", "timestep", "condition"):
            assert torch.equal(a[0][key], b[0][key]), (i, key)
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]), i
        assert a[4].keys() == b[4].keys() and torch.equal(a[4]["nfe"], b[4]["nfe"]), i


def test_dense_nfe_is_the_same_in_every_episode():
    """The autoreset step used to count the x̂0 call of the new episode twice under dense reward."""
    env = make(dense_reward=True)
    env.reset(seed=0)
    nfe = [info["nfe"].tolist() for *_, info in (env.step(a) for a in actions(env, 3 * (K + 1) - 1))]
    assert nfe[K - 1] == nfe[2 * K] == nfe[3 * K + 1] == [K] * 4


def test_non_finite_reward_raises_at_the_episode_end_or_on_check():
    def broken(images, conditions):
        return torch.full((len(images),), float("nan"))

    env = make(reward=broken, dense_reward=True)
    env.reset(seed=0)
    steps = actions(env, K)
    for action in steps[:-1]:
        env.step(action)  # recorded, not read
    with pytest.raises(ValueError, match="reward 'broken' returned NaN for 4 of 4 images"):
        env.check()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="reward 'broken' returned NaN for 4 of 4 images"):
        for action in steps:
            env.step(action)
    quiet = make(reward=broken, validate=False)
    quiet.reset(seed=0)
    for action in steps:
        _, reward, *_ = quiet.step(action)
    assert reward.isnan().all(), "validate=False: no checks at all"


def test_a_new_episode_forgets_the_last_ones_records():
    env = make()
    env.reset(seed=0)
    env.step(torch.full((4, 1, 8, 8), float("nan")))
    env.reset(seed=0)  # the bad episode is abandoned: its records go with it
    for action in actions(env, K):
        env.step(action)


def test_single_env_checks_every_step():
    """The numpy env copies every observation to the host anyway, so it reads the checks at every step."""
    env = DiffusionSteerEnv(num_steps=K, model="digits-flow", reward=None)
    with torch.no_grad():
        next(env.backend.denoiser.parameters()).view(-1)[0] = float("nan")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="the model output is NaN/inf at denoising step 0"):
        env.step(env.action_space.sample())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["noise", "latent", "noise-dense", "noise-cfg-fork"])
def test_lockstep_step_does_not_sync_on_cuda(case):
    env = make(device="cuda", **CASES[case])
    env.reset(seed=0)
    steps = actions(env, 3 * (K + 1))
    for action in steps[: K + 1]:  # warm-up: first calls may initialise libraries (and sync) once
        env.step(action)
    for i, action in enumerate(steps[K + 1 :]):
        torch.cuda.set_sync_debug_mode(0 if i % (K + 1) == K - 1 else "error")
        try:
            env.step(action)
        finally:
            torch.cuda.set_sync_debug_mode(0)
