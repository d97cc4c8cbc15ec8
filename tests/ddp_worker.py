"""Run by tests/test_trainer.py under `torchrun --nproc_per_node N`: one epoch, then each rank saves its LoRA.

`ddp_worker.py OUT ALGO [draws]`: with `draws`, each rank also saves the seed of each of its random streams and
every normal draw it made during the epoch, keyed by the seed of the generator drawn from (`rank<r>_draws.pt`).
"""

import atexit
import os
import sys

import torch
import torch.distributed as td

import agents.trainer
from agents.trainer import TrainConfig, Trainer
from diffenv.models.lora import lora_state_dict

def report_exit() -> None:
    """Registered before the trainer joins the group, so it runs after `shutdown_distributed` (atexit is LIFO)."""
    print(f"rank {os.environ['RANK']} in the process group at exit: {td.is_initialized()}", flush=True)


def record_draws() -> tuple[dict[int, list[torch.Tensor]], list[torch.Tensor]]:
    """Record every `torch.randn(..., generator=g)` by `g.initial_seed()`, and each rollout's x_T rows."""
    draws, x_T = {}, []
    randn, collect = torch.randn, agents.trainer.collect_rollout

    def recorded_randn(*args, generator=None, **kwargs):
        out = randn(*args, generator=generator, **kwargs)
        if generator is not None:
            draws.setdefault(generator.initial_seed(), []).append(out.detach().flatten().clone())
        return out

    def recorded_collect(*args, **kwargs):
        rollout = collect(*args, **kwargs)
        x_T.append(rollout["latents"][:, 0].flatten(1).clone())
        return rollout

    torch.randn, agents.trainer.collect_rollout = recorded_randn, recorded_collect
    return draws, x_T


if __name__ == "__main__":
    atexit.register(report_exit)
    torch.set_num_threads(1)
    out, algo = sys.argv[1], sys.argv[2]
    world = int(os.environ["WORLD_SIZE"])
    draws, x_T = record_draws() if sys.argv[3:] == ["draws"] else (None, None)
    cfg = TrainConfig(algo=algo, model="digits-flow", num_steps=2, images=8 * world, out=out, progress=False,
                      grid_every=0, algo_overrides={"images_per_epoch": 8 * world, "group_size": 4,
                                                    "minibatch_size": 8})
    trainer = Trainer(cfg)
    gens = {"env": trainer.env.generator, "policy_noise": trainer.noise_gen, "shuffle": trainer.shuffle_gen,
            "algorithm": getattr(trainer.algo, "generator", None)}
    seeds = {name: g.initial_seed() for name, g in gens.items() if g is not None} | {"torch": torch.initial_seed()}
    rows = trainer.train()
    from safetensors.torch import save_file

    save_file(lora_state_dict(trainer.policy.denoiser), f"{out}/rank{trainer.dist.rank}.safetensors")
    if draws is not None:
        torch.save({"seeds": seeds, "draws": {s: torch.cat(d) for s, d in draws.items()}, "x_T": torch.cat(x_T)},
                   f"{out}/rank{trainer.dist.rank}_draws.pt")
    print(f"rank {trainer.dist.rank} world {trainer.dist.world_size} rows {len(rows)} "
          f"images {trainer.images_seen} local_envs {trainer.env.num_envs}")
