"""Fine-tune a diffusion model with Stable-Baselines3's own PPO, through `DiffusionActorCriticPolicy`.

The env runs in `action_mode="latent"`: SB3's action is the next latent x_{t−1}, drawn from
N(μ_θ(x_t, t, c), σ_t² I) where μ_θ is the LoRA-adapted denoiser and σ_t the sampler's (not learned).
SB3 supplies everything else: rollout buffer, GAE critic (γ = 1), advantage normalisation, clipping.
The trained policy is saved and reloaded with `PPO.load` to show the round trip.

    python examples/sb3_ppo_diffusion.py            # default budget (wall time: README)
    python examples/sb3_ppo_diffusion.py --smoke    # seconds (CI)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from stable_baselines3 import PPO

from agents.integrations.sb3 import DiffusionActorCriticPolicy, DiffusionSteerSB3VecEnv, evaluate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-flow", help="embedded model name")
    p.add_argument("--reward", default="digit_classifier", help="reward name")
    p.add_argument("--num-steps", type=int, default=3, help="sampler steps per image (K)")
    p.add_argument("--num-envs", type=int, default=32, help="sub-envs (images in flight)")
    p.add_argument("--total-timesteps", type=int, default=9216, help="SB3 timesteps (= images × K)")
    p.add_argument("--n-steps", type=int, default=6, help="rollout length per sub-env (a multiple of K)")
    p.add_argument("--batch-size", type=int, default=48, help="PPO minibatch size")
    p.add_argument("--n-epochs", type=int, default=2, help="PPO epochs per rollout")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (LoRA and critic)")
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--eval-images", type=int, default=256, help="images in the fixed-seed evaluation")
    p.add_argument("--eval-seed", type=int, default=1234, help="seed of the evaluation (env and sampling noise)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--smoke", action="store_true", help="tiny budget for CI")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_envs, args.total_timesteps, args.eval_images, args.batch_size = 8, 96, 16, 24
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    env_kwargs = dict(model=args.model, reward=args.reward, num_steps=args.num_steps, action_mode="latent")
    venv = DiffusionSteerSB3VecEnv(args.num_envs, seed=args.seed, **env_kwargs)
    eval_venv = DiffusionSteerSB3VecEnv(args.eval_images, **env_kwargs)
    diffusion_kwargs = dict(model=args.model, num_steps=args.num_steps, lora_rank=args.lora_rank)
    model = PPO(DiffusionActorCriticPolicy, venv, policy_kwargs={"diffusion_kwargs": diffusion_kwargs},
                n_steps=args.n_steps, batch_size=args.batch_size, n_epochs=args.n_epochs, learning_rate=args.lr,
                gamma=1.0, gae_lambda=0.95, max_grad_norm=1.0, seed=args.seed, device="cpu")
    before = evaluate(model, eval_venv, args.eval_seed)
    print(f"reward before: {before:.4f}  ({args.eval_images} images, {args.model}, {args.num_steps} steps, "
          f"eval seed {args.eval_seed})")
    start = time.perf_counter()
    model.learn(args.total_timesteps)
    wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "ppo_diffusion.zip")
        model = PPO.load(Path(tmp) / "ppo_diffusion.zip", device="cpu")
    after = evaluate(model, eval_venv, args.eval_seed)
    images = args.total_timesteps // args.num_steps
    print(f"reward after:  {after:.4f}  (reloaded from .save; ~{images} training images, {wall:.1f} s)")


if __name__ == "__main__":
    main()
