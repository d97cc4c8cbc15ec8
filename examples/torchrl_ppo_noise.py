"""Noise-space RL with TorchRL: PPO + GAE steer a frozen diffusion model through its per-step noise.

The env runs in `action_mode="noise"`: the action is the ε of each sampler step,
x_{t−1} = μ_base(x_t, t, c) + σ_t ε, so the model's weights never change (DSRL, Wagenmaker et al. 2025).
The actor is a small CNN Gaussian over ε whose mean starts at 0 with std 1, i.e. the untrained policy
*is* the base sampler; `action_bound` clamps ε (the implicit regulariser). A value network on the same
observation gives GAE advantages (γ = 1: the reward is terminal).

    python examples/torchrl_ppo_noise.py            # default budget (wall time: README)
    python examples/torchrl_ppo_noise.py --smoke    # seconds (CI)
"""

from __future__ import annotations

import argparse
import time

import torch
from torchrl.collectors import Collector
from torchrl.envs.utils import ExplorationType
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from agents.integrations.torchrl import DiffusionSteerTorchRLEnv, evaluate, make_noise_actor_critic


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-flow", help="embedded model (or diffusers path)")
    p.add_argument("--reward", default="digit_classifier", help="reward name")
    p.add_argument("--num-steps", type=int, default=3, help="sampler steps per image (K)")
    p.add_argument("--action-bound", type=float, default=3.0, help="ε is clamped to [-bound, bound]")
    p.add_argument("--num-envs", type=int, default=64, help="images per PPO iteration")
    p.add_argument("--iterations", type=int, default=200, help="PPO iterations (one batch of episodes each)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (actor and critic)")
    p.add_argument("--clip-epsilon", type=float, default=0.2, help="PPO ratio clip")
    p.add_argument("--gae-lambda", type=float, default=0.95, help="GAE λ (γ = 1)")
    p.add_argument("--ppo-epochs", type=int, default=2, help="passes over each batch")
    p.add_argument("--minibatch-size", type=int, default=64, help="transitions per optimizer step")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--eval-images", type=int, default=256, help="images in the fixed-seed evaluation")
    p.add_argument("--eval-seed", type=int, default=1234, help="seed of the evaluation (env and sampling noise)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--smoke", action="store_true", help="tiny budget for CI")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_envs, args.iterations, args.eval_images, args.minibatch_size = 8, 2, 16, 12
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    env_kwargs = dict(model=args.model, reward=args.reward, num_steps=args.num_steps, action_mode="noise",
                      action_bound=args.action_bound)
    env = DiffusionSteerTorchRLEnv(args.num_envs, seed=args.seed, **env_kwargs)
    eval_env = DiffusionSteerTorchRLEnv(args.eval_images, **env_kwargs)
    actor, critic = make_noise_actor_critic(env)
    advantage = GAE(gamma=1.0, lmbda=args.gae_lambda, value_network=critic)
    loss_fn = ClipPPOLoss(actor, critic, clip_epsilon=args.clip_epsilon, entropy_coeff=0.0,
                          loss_critic_type="l2", normalize_advantage=True)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=args.lr)

    def report(when: str) -> None:
        sampled = evaluate(eval_env, actor, args.eval_seed)
        mean = evaluate(eval_env, actor, args.eval_seed, ExplorationType.DETERMINISTIC)
        print(f"reward {when}: {sampled:.4f} sampled ε, {mean:.4f} mean ε  ({args.eval_images} images, "
              f"{args.model}, {args.num_steps} steps, eval seed {args.eval_seed})")

    report("before")
    frames = args.num_envs * env.episode_length  # one episode of every sub-env per batch
    collector = Collector(env, actor, frames_per_batch=frames, total_frames=frames * args.iterations,
                          auto_register_policy_transforms=False)
    start = time.perf_counter()
    for it, batch in enumerate(collector):
        with torch.no_grad():
            advantage(batch)  # writes "advantage" and "value_target" [N, K, 1]
        steps = batch.reshape(-1)
        for _ in range(args.ppo_epochs):
            for idx in torch.randperm(len(steps)).split(args.minibatch_size):
                out = loss_fn(steps[idx])
                loss = out["loss_objective"] + out["loss_critic"]
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(loss_fn.parameters(), args.max_grad_norm)
                optimizer.step()
        if it % 25 == 0 or it == args.iterations - 1:
            print(f"iter {it:3d}  train reward {batch['next', 'reward'][:, -1].mean():.4f}  "
                  f"clip_fraction {out['clip_fraction']:.3f}  loss_critic {out['loss_critic']:.4f}")
    collector.shutdown()
    wall = time.perf_counter() - start
    report("after ")
    print(f"trained on {args.iterations * args.num_envs} images in {wall:.1f} s")


if __name__ == "__main__":
    main()
