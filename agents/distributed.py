"""Data-parallel plumbing for `torchrun` (gloo on CPU, NCCL on GPU), and its one-process stand-in.

Rollouts are sharded by rank (each rank generates `images_per_epoch / world_size` images with random
streams of its own, `stream_seed`); statistics that need every sample (DDPO's per-condition buffers,
logged means) all-gather; LoRA gradients are averaged with `all_reduce` after every backward pass.
"""

from __future__ import annotations

import atexit
import os

import numpy as np
import torch
import torch.distributed as td


#: what each per-rank random stream drives; a stream's seed is keyed by (rank, index of its purpose here), so a new
#: purpose goes at the end (the others keep their streams)
PURPOSES = ("env", "policy_noise", "shuffle", "torch", "algorithm")


def stream_seed(seed: int, rank: int, purpose: str) -> int:
    """The seed (63 bits) of rank `rank`'s random stream for `purpose` (one of `PURPOSES`) in a run seeded `seed`.

    It is `SeedSequence(seed).spawn(world)[rank].spawn(len(PURPOSES))[purpose]` (numpy's keyed derivation, written
    as the child's `spawn_key`): every (rank, purpose) gets a hashed seed of its own, for any world size, where
    offsets such as `seed + 1000·rank` and `seed + 2000 + rank` make one rank's stream another's. A rank's streams
    do not depend on the world size, but its share of the images does, so a run's results depend on the world size.
    """
    key = (int(rank), PURPOSES.index(purpose))
    return int(np.random.SeedSequence(int(seed), spawn_key=key).generate_state(1, np.uint64)[0] >> np.uint64(1))


class Dist:
    """rank / world size and the few collectives the trainer needs (no-ops in one process)."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def stream_seed(self, seed: int, purpose: str) -> int:
        """This rank's seed for `purpose` (`stream_seed`)."""
        return stream_seed(seed, self.rank, purpose)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from every rank, in rank order."""
        if not self.active:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        td.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def local_slice(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of an all-gathered tensor."""
        n = len(x) // self.world_size
        return x[self.rank * n:(self.rank + 1) * n]

    def average_gradients(self, params) -> None:
        if not self.active:
            return
        for p in params:
            if p.grad is not None:
                td.all_reduce(p.grad, op=td.ReduceOp.SUM)
                p.grad /= self.world_size

    def broadcast_(self, params) -> None:
        """Copy rank 0's values into every rank's tensors (in place)."""
        if self.active:
            for p in params:
                td.broadcast(p.data, src=0)

    def gather_objects(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            td.barrier()


def init_distributed(device: str) -> Dist:
    """Join the `torchrun` process group when launched by it; otherwise a one-process `Dist`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    if not td.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        td.init_process_group(backend=backend)
        atexit.register(shutdown_distributed)
    return Dist(td.get_rank(), td.get_world_size())


def shutdown_distributed() -> None:
    """Leave the process group (a no-op when none is joined; safe to call twice).

    `init_distributed` registers this with `atexit`, so a process that joined the group leaves it while
    the interpreter is still whole. Without it, gloo's worker threads outlive Python's finalisation and
    a rank can die at exit with "terminate called without an active exception" (SIGABRT) after its work
    finished (seen in CI under `torchrun --nproc_per_node 2`; pytorch/pytorch#190489). The call is local
    to this rank: every collective the trainer issues has completed when it returns, so no barrier.
    """
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
