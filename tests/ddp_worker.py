"""Run by tests/test_trainer.py under `torchrun --nproc_per_node 2`: one epoch, then each rank saves its LoRA."""

import atexit
import os
import sys

import torch
import torch.distributed as td

from agents.trainer import TrainConfig, Trainer
from diffenv.models.lora import lora_state_dict

def report_exit() -> None:
    """Registered before the trainer joins the group, so it runs after `shutdown_distributed` (atexit is LIFO)."""
    print(f"rank {os.environ['RANK']} in the process group at exit: {td.is_initialized()}", flush=True)


if __name__ == "__main__":
    atexit.register(report_exit)
    torch.set_num_threads(1)
    out = sys.argv[1]
    cfg = TrainConfig(algo=sys.argv[2], model="digits-flow", num_steps=2, images=16, out=out, progress=False,
                      grid_every=0, algo_overrides={"images_per_epoch": 16, "group_size": 4, "minibatch_size": 8})
    trainer = Trainer(cfg)
    rows = trainer.train()
    from safetensors.torch import save_file

    save_file(lora_state_dict(trainer.policy.denoiser), f"{out}/rank{trainer.dist.rank}.safetensors")
    print(f"rank {trainer.dist.rank} world {trainer.dist.world_size} rows {len(rows)} "
          f"images {trainer.images_seen} local_envs {trainer.env.num_envs}")
