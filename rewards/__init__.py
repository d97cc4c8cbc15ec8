"""Reward functions for steering diffusion models (docs/design.md §4).

A reward maps `images [B, C, H, W] in [0, 1]` and `conditions [B]` to a float32 tensor `[B]`::

    import rewards
    reward = rewards.make("digit_classifier", device="cpu")        # p(c | x) from the shipped CNN
    judge = rewards.make("digit_judge", mode="log_prob")            # held-out evaluation only
    mixed = rewards.make("weighted_sum", weights={"digit_classifier": 1.0, "jpeg_compressibility": 0.1})
    custom = rewards.as_reward(lambda images, conditions: images.mean(dim=(1, 2, 3)))
    clip = rewards.make("clip_score", path="openai/clip-vit-base-patch32", prompts="prompts.txt")
    rated = rewards.make("ratings", path="runs/ratings_demo/ratings_head.safetensors")

Importing this package registers the built-in rewards; it does not import `diffenv`.
"""

from rewards.base import CallableReward, Reward
from rewards.registry import factory, make, names, register

# imported for their @register side effects, after the registry exists
from rewards import classifier, clip, independent_judge, jpeg, ratings, shapes  # noqa: E402,F401  isort:skip
from rewards.combine import WeightedSum, as_reward  # noqa: E402  isort:skip

__all__ = ["Reward", "CallableReward", "WeightedSum", "make", "register", "names", "factory", "as_reward"]
