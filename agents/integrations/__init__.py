"""Adapters to other RL libraries: TorchRL (`torchrl`), Stable-Baselines3 (`sb3`) and the small networks they
share (`nets`). The core (`agents.policy`, `agents.trainer`, ...) never imports them."""
