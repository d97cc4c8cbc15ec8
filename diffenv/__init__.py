"""DiffusionSteer: denoising as a gymnasium MDP (`DiffusionSteer-v0`).

Importing `diffenv` registers the env:

    import gymnasium as gym, diffenv
    env = gym.make("DiffusionSteer-v0", model="digits-eps", reward="digit_classifier", num_steps=10)
    venv = gym.make_vec("DiffusionSteer-v0", num_envs=64, vectorization_mode="vector_entry_point")
"""

from __future__ import annotations

import gymnasium as gym

from diffenv.quiet import quiet_third_party

quiet_third_party()  # before the backends import transformers / diffusers

from diffenv.env import DiffusionSteerEnv  # noqa: E402
from diffenv.sampling import GenerationResult, generate  # noqa: E402
from diffenv.vector_env import DiffusionSteerVectorEnv  # noqa: E402

ENV_ID = "DiffusionSteer-v0"

if ENV_ID not in gym.registry:
    gym.register(
        id=ENV_ID,
        entry_point="diffenv.env:DiffusionSteerEnv",
        vector_entry_point="diffenv.vector_env:DiffusionSteerVectorEnv",
    )

__all__ = ["ENV_ID", "DiffusionSteerEnv", "DiffusionSteerVectorEnv", "GenerationResult", "generate"]
__version__ = "0.1.0"
