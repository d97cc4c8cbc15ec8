"""A self-contained, CleanRL-style PPO on `DiffusionSteer-v0` using only the plain gymnasium API.

Nothing from `agents/`: the env comes from `gym.make_vec(..., vectorization_mode="vector_entry_point")`,
the Dict observation is flattened here (the layout of `gymnasium.spaces.flatten`: one-hot condition,
latent, timestep), and the agent is an MLP Gaussian over the per-step noise ε (`action_mode="noise"`):
any gymnasium agent works on this env. Structure and names follow CleanRL's `ppo_continuous_action.py`
(Huang et al. 2022); γ = 1 because the reward is terminal.

    python examples/cleanrl_style.py            # default budget (wall time: README)
    python examples/cleanrl_style.py --smoke    # seconds (CI)
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium.vector import AutoresetMode
from torch import nn
from torch.distributions import Normal

import diffenv  # noqa: F401  (registers DiffusionSteer-v0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-flow", help="embedded model name")
    p.add_argument("--num-steps-sampler", type=int, default=3, help="sampler steps per image (episode length K)")
    p.add_argument("--action-bound", type=float, default=3.0, help="ε is clamped to [-bound, bound] by the env")
    p.add_argument("--num-envs", type=int, default=64, help="parallel sub-envs")
    p.add_argument("--num-steps", type=int, default=3, help="rollout length per sub-env per iteration")
    p.add_argument("--num-iterations", type=int, default=200, help="PPO iterations")
    p.add_argument("--learning-rate", type=float, default=3e-4, help="Adam learning rate")
    p.add_argument("--gae-lambda", type=float, default=0.95, help="GAE λ")
    p.add_argument("--num-minibatches", type=int, default=3, help="minibatches per epoch")
    p.add_argument("--update-epochs", type=int, default=2, help="epochs per iteration")
    p.add_argument("--clip-coef", type=float, default=0.2, help="PPO ratio clip")
    p.add_argument("--vf-coef", type=float, default=0.5, help="value-loss weight")
    p.add_argument("--max-grad-norm", type=float, default=0.5, help="gradient-norm clip")
    p.add_argument("--eval-images", type=int, default=256, help="images in the fixed-seed evaluation")
    p.add_argument("--eval-seed", type=int, default=1234, help="seed of the evaluation (env and sampling noise)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--smoke", action="store_true", help="tiny budget for CI")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_envs, args.num_iterations, args.eval_images = 8, 2, 16
    return args


def make_envs(args, num_envs: int):
    return gym.make_vec("DiffusionSteer-v0", num_envs=num_envs, vectorization_mode="vector_entry_point",
                        model=args.model, num_steps=args.num_steps_sampler, action_mode="noise",
                        action_bound=args.action_bound, autoreset_mode=AutoresetMode.SAME_STEP)


def flatten_obs(obs: dict, space: gym.spaces.Dict) -> torch.Tensor:
    """Batched Dict obs → [N, D] in `gym.spaces.flatten`'s layout (keys in order, Discrete one-hot)."""
    parts = []
    for key, sub in space.spaces.items():
        x = torch.as_tensor(obs[key])
        if isinstance(sub, gym.spaces.Discrete):
            parts.append(F.one_hot(x.long() - sub.start, int(sub.n)).float())
        else:
            parts.append(x.float().reshape(len(x), -1))
    return torch.cat(parts, 1)


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, obs_dim: int, action_shape: tuple[int, ...]):
        super().__init__()
        act_dim = int(np.prod(action_shape))
        self.action_shape = action_shape
        self.critic = nn.Sequential(layer_init(nn.Linear(obs_dim, 128)), nn.Tanh(),
                                    layer_init(nn.Linear(128, 128)), nn.Tanh(), layer_init(nn.Linear(128, 1), std=1.0))
        # small last layer and log-std 0: the untrained policy draws ε ≈ N(0, I), i.e. the base sampler
        self.actor_mean = nn.Sequential(layer_init(nn.Linear(obs_dim, 128)), nn.Tanh(),
                                        layer_init(nn.Linear(128, 128)), nn.Tanh(),
                                        layer_init(nn.Linear(128, act_dim), std=0.01))
        self.actor_logstd = nn.Parameter(torch.zeros(1, act_dim))

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        action_mean = self.actor_mean(x)
        probs = Normal(action_mean, self.actor_logstd.expand_as(action_mean).exp())
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action).sum(1), probs.entropy().sum(1), self.critic(x)


@torch.no_grad()
def evaluate(agent: Agent, envs, seed: int) -> float:
    """Mean terminal reward of one episode per sub-env, fixed env seed and sampling seed."""
    torch.manual_seed(seed)
    obs, _ = envs.reset(seed=seed)
    for _ in range(envs.unwrapped.episode_length):
        action = agent.get_action_and_value(flatten_obs(obs, envs.single_observation_space))[0]
        obs, reward, terminations, _, _ = envs.step(action.reshape(-1, *agent.action_shape))
    return float(torch.as_tensor(reward).mean())


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    envs, eval_envs = make_envs(args, args.num_envs), make_envs(args, args.eval_images)
    obs_space, action_shape = envs.single_observation_space, envs.single_action_space.shape
    obs_dim = gym.spaces.flatdim(obs_space)
    agent = Agent(obs_dim, action_shape)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    before = evaluate(agent, eval_envs, args.eval_seed)
    print(f"reward before: {before:.4f}  ({args.eval_images} images, {args.model}, "
          f"{args.num_steps_sampler} steps, eval seed {args.eval_seed})")

    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    act_dim = int(np.prod(action_shape))
    obs_buf = torch.zeros((args.num_steps, args.num_envs, obs_dim))
    actions = torch.zeros((args.num_steps, args.num_envs, act_dim))
    logprobs, rewards, dones, values = (torch.zeros((args.num_steps, args.num_envs)) for _ in range(4))

    start = time.perf_counter()
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = flatten_obs(next_obs, obs_space)
    next_done = torch.zeros(args.num_envs)
    for iteration in range(args.num_iterations):
        finished = []
        for step in range(args.num_steps):
            obs_buf[step], dones[step] = next_obs, next_done
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
            values[step], actions[step], logprobs[step] = value.flatten(), action, logprob
            next_obs, reward, terminations, truncations, _ = envs.step(action.reshape(-1, *action_shape))
            done = torch.as_tensor(terminations) | torch.as_tensor(truncations)
            rewards[step] = torch.as_tensor(reward).float()
            next_obs, next_done = flatten_obs(next_obs, obs_space), done.float()
            finished.extend(rewards[step][done].tolist())

        with torch.no_grad():  # GAE, γ = 1
            next_value = agent.get_value(next_obs).flatten()
            advantages = torch.zeros_like(rewards)
            lastgaelam = 0
            for t in reversed(range(args.num_steps)):
                nextnonterminal = 1.0 - (next_done if t == args.num_steps - 1 else dones[t + 1])
                nextvalues = next_value if t == args.num_steps - 1 else values[t + 1]
                delta = rewards[t] + nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + args.gae_lambda * nextnonterminal * lastgaelam
            returns = advantages + values

        b_obs, b_actions = obs_buf.reshape(-1, obs_dim), actions.reshape(-1, act_dim)
        b_logprobs, b_advantages = logprobs.reshape(-1), advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        for _ in range(args.update_epochs):
            for mb in torch.randperm(batch_size).split(minibatch_size):
                _, newlogprob, _, newvalue = agent.get_action_and_value(b_obs[mb], b_actions[mb])
                ratio = (newlogprob - b_logprobs[mb]).exp()
                mb_adv = (b_advantages[mb] - b_advantages[mb].mean()) / (b_advantages[mb].std() + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio,
                                    -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                v_loss = 0.5 * ((newvalue.flatten() - b_returns[mb]) ** 2).mean()
                loss = pg_loss + args.vf_coef * v_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
        if iteration % 25 == 0 or iteration == args.num_iterations - 1:
            print(f"iter {iteration:3d}  episodic reward {np.mean(finished) if finished else float('nan'):.4f}  "
                  f"v_loss {v_loss.item():.4f}")
    wall = time.perf_counter() - start

    after = evaluate(agent, eval_envs, args.eval_seed)
    print(f"reward after:  {after:.4f}  ({args.num_iterations * batch_size} env steps, {wall:.1f} s)")
    envs.close()
    eval_envs.close()


if __name__ == "__main__":
    main()
