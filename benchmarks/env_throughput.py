"""How much does the environment cost on top of the network? (targets: native / bare ≤ 1.05, SyncVectorEnv / native ≥ 10)

    python benchmarks/env_throughput.py [--num-envs 64] [--num-steps 10] [--episodes 20] [--model digits-eps]
                                        [--device cpu] [--validate 1] [--skip-sync-env]

Measures, in one run, whole episodes (K steps + terminal reward) at batch N:
1. bare: the batched denoiser + sampler transition maths + reward on raw tensors (no env);
2. native: `gym.make_vec(..., vectorization_mode="vector_entry_point")` stepped with torch actions;
3. sync: gymnasium's `SyncVectorEnv` over N single envs (one network call per sub-env per step).
Prints median seconds per episode, images/s and the ratios (targets: native/bare <= 1.05,
sync/native >= 10). The native env runs with its validation on (the default) unless `--validate 0`.
On an accelerator each timed episode ends with a device synchronize, so the times are the device's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np
import torch

import diffenv  # noqa: F401  (registers DiffusionSteer-v0)


def timed(fns, episodes: int, device: torch.device) -> list[float]:
    """Median seconds per call of each function, calls interleaved so drift hits all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(episodes):
        for fn, ts in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def episode_fns(venv, device: torch.device, seed: int = 0):
    """(bare, native): one whole episode of the batch, without the env (the batched denoiser, the sampler's
    transition maths and the reward on raw tensors) and through the native vector env `venv`."""
    backend, sampler, reward_fn, n, k = venv.backend, venv.sampler, venv.reward_fn, venv.num_envs, venv.cfg.num_steps
    conditions = venv.condition_set  # [n_conditions], on the device
    gen = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def bare():
        x = torch.randn((n, *backend.latent_shape), generator=gen, device=device)
        c = conditions[torch.randint(0, len(conditions), (n,), generator=gen, device=device)]
        for i in range(k):
            idx = torch.full((n,), i, dtype=torch.long, device=device)
            out = backend.predict(x, sampler.model_timesteps[idx], c)
            mean, std = sampler.step_distribution(x, out, idx)
            x = mean + std.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen, device=device)
        return reward_fn(backend.decode(x), c)

    @torch.no_grad()
    def native():
        obs, _ = venv.reset()
        for _ in range(k):
            obs, r, *_ = venv.step(torch.randn(obs["latent"].shape, generator=gen, device=device))
        return r

    return bare, native


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--model", default="digits-eps")
    p.add_argument("--reward", default="digit_classifier")
    p.add_argument("--device", default="cpu")
    p.add_argument("--validate", type=int, choices=(0, 1), default=1, help="the native env's `validate`")
    p.add_argument("--skip-sync-env", action="store_true", help="skip the SyncVectorEnv measurement (slow)")
    a = p.parse_args(argv)
    n, k, device = a.num_envs, a.num_steps, torch.device(a.device)
    kw = dict(model=a.model, reward=a.reward, num_steps=k, seed=0, device=a.device)
    venv = gym.make_vec("DiffusionSteer-v0", num_envs=n, vectorization_mode="vector_entry_point",
                        **kw, **({} if a.validate else {"validate": False}))
    bare, native = episode_fns(venv, device)

    t_bare, t_native = timed([bare, native], a.episodes, device)
    rows = [("bare batched denoiser+sampler", t_bare), ("native vector env", t_native)]
    if not a.skip_sync_env:
        sync = gym.vector.SyncVectorEnv([lambda: gym.make("DiffusionSteer-v0", **kw) for _ in range(n)])
        rng = np.random.default_rng(0)

        @torch.no_grad()
        def sync_episode():
            sync.reset(seed=0)
            for _ in range(k):
                sync.step(rng.standard_normal(sync.action_space.shape).astype(np.float32))

        (t_sync,) = timed([sync_episode], max(1, a.episodes // 5), device)
        rows.append(("SyncVectorEnv of single envs", t_sync))
    print(f"model={a.model} reward={a.reward} num_envs={n} num_steps={k} device={device} "
          f"validate={bool(a.validate)} torch_threads={torch.get_num_threads()}")
    for name, t in rows:
        print(f"{name:32s} {1e3 * t:9.1f} ms/episode  {n / t:9.1f} images/s")
    print(f"native / bare = {t_native / t_bare:.3f}   (target <= 1.05)")
    if not a.skip_sync_env:
        print(f"sync / native = {t_sync / t_native:.1f}x  (target >= 10)")


if __name__ == "__main__":
    main()
