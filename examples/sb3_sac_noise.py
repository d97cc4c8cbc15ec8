"""Noise-space RL with Stable-Baselines3 SAC: steer a frozen diffusion model through its noise (DSRL).

DSRL (Wagenmaker et al. 2025) leaves the model untouched and learns a policy over the noise it is
sampled with. Two env modes:

| `--action-mode` | action | episode | default regime |
|---|---|---|---|
| `initial_noise` (default) | x_T, then the deterministic sampler | 1 step (bandit) | digits-eps, 1 DDIM step |
| `noise` | ε of every SDE step | K steps | digits-flow, 3 steps |

SAC squashes actions into `[−action_bound, action_bound]`; a bound of 1.5 makes the untrained policy's
noise about as wide as N(0, I), so training starts near the base sampler. The evaluation reports the
sampled policy (diverse images) and its mean action (one image per condition in `initial_noise` mode).

    python examples/sb3_sac_noise.py                 # default budget (wall time: README)
    python examples/sb3_sac_noise.py --action-mode noise
    python examples/sb3_sac_noise.py --smoke         # seconds (CI)
"""

from __future__ import annotations

import argparse
import time

from stable_baselines3 import SAC
from stable_baselines3.common.vec_env import VecMonitor

from agents.integrations.sb3 import DiffusionSteerSB3VecEnv, evaluate, latent_policy_kwargs

REGIMES = {"initial_noise": ("digits-eps", 1), "noise": ("digits-flow", 3)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--action-mode", choices=sorted(REGIMES), default="initial_noise", help="what SAC controls")
    p.add_argument("--model", default=None, help="embedded model name (default: by action mode, see table)")
    p.add_argument("--num-steps", type=int, default=None, help="sampler steps per image (default: by action mode)")
    p.add_argument("--reward", default="digit_classifier", help="reward name")
    p.add_argument("--action-bound", type=float, default=1.5, help="noise box half-width")
    p.add_argument("--num-envs", type=int, default=16, help="sub-envs stepped together")
    p.add_argument("--total-timesteps", type=int, default=8000, help="SB3 timesteps")
    p.add_argument("--learning-starts", type=int, default=256, help="random-policy timesteps before updates")
    p.add_argument("--gradient-steps", type=int, default=2, help="SAC updates per env step (of the whole batch)")
    p.add_argument("--batch-size", type=int, default=128, help="replay minibatch size")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (actor, critics, entropy coefficient)")
    p.add_argument("--ent-coef", default="auto_0.01", help="SAC entropy coefficient ('auto_<init>' tunes it)")
    p.add_argument("--eval-images", type=int, default=256, help="images in the fixed-seed evaluation")
    p.add_argument("--eval-seed", type=int, default=1234, help="seed of the evaluation (env and sampling noise)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--smoke", action="store_true", help="tiny budget for CI")
    args = p.parse_args(argv)
    model, num_steps = REGIMES[args.action_mode]
    args.model = args.model or model
    args.num_steps = args.num_steps or num_steps
    if args.smoke:
        args.num_envs, args.total_timesteps, args.learning_starts, args.eval_images = 8, 64, 16, 16
        args.batch_size = 16
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    env_kwargs = dict(model=args.model, reward=args.reward, num_steps=args.num_steps,
                      action_mode=args.action_mode, action_bound=args.action_bound)
    venv = VecMonitor(DiffusionSteerSB3VecEnv(args.num_envs, seed=args.seed, **env_kwargs))
    eval_venv = DiffusionSteerSB3VecEnv(args.eval_images, **env_kwargs)
    model = SAC("MultiInputPolicy", venv, policy_kwargs=latent_policy_kwargs(net_arch=[128, 128]),
                learning_rate=args.lr, batch_size=args.batch_size, learning_starts=args.learning_starts,
                gradient_steps=args.gradient_steps, ent_coef=args.ent_coef, gamma=1.0, seed=args.seed,
                device="cpu")

    def report(when: str) -> None:
        sampled = evaluate(model, eval_venv, args.eval_seed)
        mean = evaluate(model, eval_venv, args.eval_seed, deterministic=True)
        print(f"reward {when}: {sampled:.4f} sampled, {mean:.4f} mean action  ({args.eval_images} images, "
              f"{args.action_mode}, {args.model}, {args.num_steps} steps, eval seed {args.eval_seed})")

    report("before")
    start = time.perf_counter()
    model.learn(args.total_timesteps)
    wall = time.perf_counter() - start
    report("after ")
    images = args.total_timesteps // venv.venv.vector_env.episode_length
    print(f"trained on ~{images} images in {wall:.1f} s")


if __name__ == "__main__":
    main()
