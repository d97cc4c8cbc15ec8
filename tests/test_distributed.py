"""Data-parallel plumbing: every rank's random streams are its own, for any world size."""

from __future__ import annotations

import pytest
import torch

from agents.distributed import PURPOSES, stream_seed
from agents.trainer import TrainConfig, Trainer


def pair_keys(values: torch.Tensor) -> set[int]:
    """Every two consecutive float32 values of a stream as one 64-bit key (a shared pair means a shared stretch)."""
    bits = values.view(torch.int32).long() & 0xFFFFFFFF
    return set((bits[:-1] << 32 | bits[1:]).tolist())


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1])
def test_64_ranks_draw_from_distinct_streams(seed):
    """A simulated world of 64 ranks: every (rank, purpose) gets its own seed, and no stretch of one stream's first
    1,024 normal draws is found in another's."""
    seeds = {(rank, purpose): stream_seed(seed, rank, purpose) for rank in range(64) for purpose in PURPOSES}
    assert len(set(seeds.values())) == len(seeds) == 64 * len(PURPOSES)
    assert all(0 <= s < 2**63 for s in seeds.values())
    seen: set[int] = set()
    for s in seeds.values():
        keys = pair_keys(torch.randn(1024, generator=torch.Generator().manual_seed(s)))
        assert not keys & seen
        seen |= keys


def test_offset_seeds_would_collide():
    """The check above has teeth: the former offsets (env `seed + 1000·rank`, policy noise `seed + 2000 + rank`,
    shuffle `seed + 3000 + rank`) give rank 2's env stream to rank 0's policy noise at 3 ranks already."""
    offsets = {(purpose, rank): seed for rank in range(3)
               for purpose, seed in (("env", 1000 * rank), ("policy_noise", 2000 + rank), ("shuffle", 3000 + rank))}
    assert offsets["env", 2] == offsets["policy_noise", 0] and len(set(offsets.values())) < len(offsets)


def test_stream_seed_is_keyed_and_deterministic():
    assert stream_seed(0, 0, "env") == stream_seed(0, 0, "env")
    assert stream_seed(0, 0, "env") != stream_seed(1, 0, "env")
    with pytest.raises(ValueError):
        stream_seed(0, 0, "no_such_purpose")


def test_trainer_seeds_every_stream_by_rank_and_purpose(tmp_path):
    cfg = TrainConfig(algo="nft", model="digits-flow", num_steps=2, images=16, out=str(tmp_path), progress=False,
                      grid_every=0, seed=3, algo_overrides={"images_per_epoch": 16, "group_size": 4, "seed": 5})
    trainer = Trainer(cfg)
    trainer.folder.release()
    assert trainer.env.generator.initial_seed() == stream_seed(3, 0, "env")
    assert trainer.noise_gen.initial_seed() == stream_seed(3, 0, "policy_noise")
    assert trainer.shuffle_gen.initial_seed() == stream_seed(3, 0, "shuffle")
    assert trainer.algo.generator.initial_seed() == stream_seed(5, 0, "algorithm")
    assert torch.initial_seed() == stream_seed(3, 0, "torch")
