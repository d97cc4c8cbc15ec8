"""Agents: the diffusion policy (denoiser + LoRA) and the diffusion-RL algorithms and trainer."""

from agents.policy import DiffusionPolicy

__all__ = ["DiffusionPolicy"]
