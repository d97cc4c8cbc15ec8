"""Fine-tune a diffusion model's LoRA with TorchRL's `ClipPPOLoss` and `Collector` (DDPO/GRPO-style).

The env runs in `action_mode="latent"`: the actor *is* the diffusion policy, one denoising step per env
step, π_θ(x_{t−1} | x_t, c) = N(μ_θ, σ_t² I) with exact log-probs. No critic: the advantage is the
group-normalised terminal reward (GRPO, Liu et al. 2025), broadcast to every step of the episode.

    python examples/torchrl_ppo_diffusion.py            # default budget (wall time: README)
    python examples/torchrl_ppo_diffusion.py --smoke    # seconds (CI)

Default regime: the rectified-flow digits model with 3 flow-SDE steps, where the unguided model is
far from its accuracy at 10 steps (README, Embedded models), so the reward has headroom.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchrl.collectors import Collector
from torchrl.objectives import ClipPPOLoss

from agents.policy import DiffusionPolicy
from agents.integrations.torchrl import DiffusionSteerTorchRLEnv, evaluate, make_diffusion_actor, terminal_group_advantage


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-flow", help="embedded model (or diffusers path)")
    p.add_argument("--reward", default="digit_classifier", help="reward name")
    p.add_argument("--num-steps", type=int, default=3, help="sampler steps per image (K)")
    p.add_argument("--num-envs", type=int, default=32, help="images per PPO iteration")
    p.add_argument("--group-size", type=int, default=8, help="images sharing a condition (GRPO group)")
    p.add_argument("--iterations", type=int, default=60, help="PPO iterations (one batch of episodes each)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the LoRA")
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--clip-epsilon", type=float, default=0.2, help="PPO ratio clip (exact per-step log-probs)")
    p.add_argument("--ppo-epochs", type=int, default=2, help="passes over each batch")
    p.add_argument("--minibatch-size", type=int, default=48, help="transitions per optimizer step")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--eval-images", type=int, default=256, help="images in the fixed-seed evaluation")
    p.add_argument("--eval-seed", type=int, default=1234, help="seed of the evaluation (env and sampling noise)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--smoke", action="store_true", help="tiny budget for CI")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_envs, args.group_size, args.iterations, args.eval_images, args.minibatch_size = 8, 4, 2, 16, 12
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    policy = DiffusionPolicy(args.model, num_steps=args.num_steps, lora_rank=args.lora_rank)
    env_kwargs = dict(policy.env_kwargs(), reward=args.reward, action_mode="latent")
    env = DiffusionSteerTorchRLEnv(args.num_envs, group_size=args.group_size, seed=args.seed, **env_kwargs)
    eval_env = DiffusionSteerTorchRLEnv(args.eval_images, **env_kwargs)
    actor = make_diffusion_actor(policy)
    loss_fn = ClipPPOLoss(actor, critic_network=None, clip_epsilon=args.clip_epsilon, entropy_bonus=False)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=args.lr)
    before = evaluate(eval_env, actor, args.eval_seed)
    print(f"reward before: {before:.4f}  ({args.eval_images} images, {args.model}, {args.num_steps} steps, "
          f"eval seed {args.eval_seed})")

    # One batch = one episode of every sub-env: [num_envs, K] transitions.
    frames = args.num_envs * env.episode_length
    collector = Collector(env, actor, frames_per_batch=frames, total_frames=frames * args.iterations,
                          auto_register_policy_transforms=False)
    start = time.perf_counter()
    for it, batch in enumerate(collector):
        batch["advantage"] = terminal_group_advantage(batch, args.group_size)  # [N, K, 1]
        steps = batch.reshape(-1)
        steps = steps[steps["scale"] > 0]  # σ = 0 steps are point masses: no decision, no gradient
        for _ in range(args.ppo_epochs):
            for idx in torch.randperm(len(steps)).split(args.minibatch_size):
                out = loss_fn(steps[idx])
                optimizer.zero_grad()
                out["loss_objective"].backward()
                torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), args.max_grad_norm)
                optimizer.step()
        if it % 10 == 0 or it == args.iterations - 1:
            print(f"iter {it:3d}  train reward {batch['next', 'reward'][:, -1].mean():.4f}  "
                  f"clip_fraction {out['clip_fraction']:.3f}  kl_approx {out['kl_approx']:.4f}")
    collector.shutdown()
    wall = time.perf_counter() - start

    after = evaluate(eval_env, actor, args.eval_seed)
    print(f"reward after:  {after:.4f}  ({args.iterations * args.num_envs} training images, {wall:.1f} s)")


if __name__ == "__main__":
    main()
