"""The trainer: exact resume, atomic checkpoints, clear errors, torchrun data parallelism."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents.trainer import TrainConfig, Trainer
from diffenv.models.lora import lora_state_dict
from host_syncs import count_host_syncs

SMALL = {"images_per_epoch": 16, "group_size": 4, "minibatch_size": 16}


def config(out, images=32, algo="grpo", **kw):
    return TrainConfig(algo=algo, model="digits-flow", num_steps=2, images=images, out=str(out), seed=0,
                       progress=False, grid_every=1, algo_overrides={**SMALL, **kw})


@pytest.mark.parametrize("algo", ["grpo", "ddpo"])
def test_two_epochs_equal_one_plus_resume(tmp_path, algo):
    straight = Trainer(config(tmp_path / "a", images=32, algo=algo))
    rows_a = straight.train()
    first = Trainer(config(tmp_path / "b", images=16, algo=algo))
    first.train()
    resumed = Trainer(config(tmp_path / "b", images=32, algo=algo), resume=True)
    assert resumed.epoch == 1 and resumed.images_seen == 16
    rows_b = resumed.train()
    a, b = lora_state_dict(straight.policy.denoiser), lora_state_dict(resumed.policy.denoiser)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows_a[-1]["reward_mean"] == rows_b[-1]["reward_mean"]
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k), "training moved B"
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert len(log) == 3 and log[0].startswith("epoch,images_seen,reward_mean")
    assert (tmp_path / "b" / "grids" / "epoch_00002.png").is_file()


def test_existing_run_is_not_overwritten(tmp_path):
    Trainer(config(tmp_path, images=16)).train()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(config(tmp_path, images=16))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    Trainer(config(tmp_path, images=16)).train()
    with pytest.raises(ValueError, match=r"different configuration: lora_rank: checkpoint 8 vs now 4"):
        cfg = config(tmp_path, images=32)
        cfg.lora_rank = 4
        Trainer(cfg, resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        Trainer(config(tmp_path, images=32), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(config(tmp_path / "none", images=32), resume=True)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(algo="ppo2"), "unknown algo 'ppo2'"),
        (dict(images=0), "images=0: expected an int >= 1"),
        (dict(algo_overrides={"learning_rate": 1.0}), r"unknown grpo option\(s\) \['learning_rate'\]"),
        (dict(algo_overrides={"images_per_epoch": 10, "group_size": 4}), "whole groups of group_size=4"),
        (dict(reward="no_such_reward"), "unknown reward 'no_such_reward'"),
    ],
)
def test_bad_training_input(tmp_path, kw, match):
    cfg = config(tmp_path / "run")
    for k, v in kw.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=match):
        Trainer(cfg)


def test_nan_reward_is_an_error_and_writes_nothing(tmp_path):
    def broken(images, conditions):
        return torch.full((len(images),), float("nan"))

    cfg = config(tmp_path / "run")
    cfg.reward = broken
    trainer = Trainer(cfg)
    with pytest.raises(ValueError, match="reward 'broken' returned NaN"):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("algo", ["ddpo", "grpo", "fpo", "nft", "fdfo"])
def test_one_host_sync_per_optimizer_step(tmp_path, algo):
    """Loss terms and diagnostics stay on the device: an optimizer step reads only the finiteness check (one
    sync), and the epoch's diagnostics come back in one transfer. Counted with the CPU proxy of `host_syncs`,
    as the difference between an epoch of 3 passes and one of 1 (the same rollout and prepare)."""

    def epoch(inner: int):
        trainer = Trainer(config(tmp_path / f"{algo}{inner}", images=16, algo=algo, inner_epochs=inner,
                                 minibatch_size=8, **({"group_size": 2} if algo == "fdfo" else {})))
        steps = 0
        step = trainer.optimizer.step

        def counted_step(*a, **k):
            nonlocal steps
            steps += 1
            return step(*a, **k)

        trainer.optimizer.step = counted_step
        with count_host_syncs() as syncs:
            row = trainer.train_epoch()
        trainer.folder.release()
        return syncs, steps, row

    once, steps_once, row = epoch(1)
    thrice, steps_thrice, _ = epoch(3)
    per_step = {op: (thrice.ops[op] - once.ops[op]) / (steps_thrice - steps_once) for op in thrice.ops | once.ops}
    assert sum(per_step.values()) == 1, per_step  # `_check_update`'s NaN/inf test of loss and gradient norm
    if algo != "ddpo":  # (DDPO's per-condition statistics are host-side by design)
        assert once.ops["tolist"] <= 2, once.ops  # the diagnostics' one read, and the weights' NaN/inf check
    assert {"loss", "loss_policy", "grad_norm", "kl_to_base"} <= row.keys() and "policy_loss" not in row


def torchrun_worker(out: Path, ranks: int, *args: str) -> subprocess.CompletedProcess:
    """`tests/ddp_worker.py OUT *args` under `torchrun --nproc_per_node ranks`; it must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(Path(__file__).parent / "ddp_worker.py"), str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_two_ranks_end_with_identical_lora(tmp_path):
    from safetensors.torch import load_file

    proc = torchrun_worker(tmp_path, 2, "ddpo")
    assert "rank 0 world 2 rows 1 images 16 local_envs 8" in proc.stdout
    # each rank left the group before interpreter teardown (gloo threads alive then can SIGABRT a rank)
    assert all(f"rank {r} in the process group at exit: False" in proc.stdout for r in (0, 1)), proc.stdout
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(r0[k].abs().sum() > 0 for k in r0 if "lora_B" in k), "the update changed the adapter"


def test_torchrun_three_ranks_draw_from_distinct_streams(tmp_path):
    """Every rank's x_T is its own: no two streams of the 3 ranks (env, policy noise, shuffle, torch, algorithm)
    share a seed, and no x_T value of one rank is among the normal draws of another (x_T, policy noise, FPO's ε).
    With seeds `seed + 1000·rank` (env) and `seed + 2000 + rank` (policy noise), 384 of rank 2's 512 x_T values
    were rank 0's step noise; independent float32 normals coincide by chance about 3e-8 per pair (< 1 value here)."""
    proc = torchrun_worker(tmp_path, 3, "fpo", "draws")
    assert "rank 0 world 3 rows 1 images 24 local_envs 8" in proc.stdout
    ranks = [torch.load(tmp_path / f"rank{r}_draws.pt") for r in range(3)]
    seeds = [s for r in ranks for s in r["seeds"].values()]
    assert len(ranks[0]["seeds"]) == 5 and len(set(seeds)) == len(seeds), [r["seeds"] for r in ranks]
    for i, mine in enumerate(ranks):
        assert mine["x_T"].shape[0] == 8 and mine["seeds"]["env"] in mine["draws"]
        theirs = torch.cat([d for j, r in enumerate(ranks) if j != i for d in r["draws"].values()])
        shared = torch.isin(mine["x_T"], theirs).sum().item()
        assert shared <= 2, f"{shared} of rank {i}'s {mine['x_T'].numel()} x_T values were drawn by another rank"


def test_a_declining_probe_is_reported_with_the_best_checkpoint(tmp_path):
    trainer = Trainer(config(tmp_path, images=16))
    trainer.folder.release()
    rows = [{"images_seen": 16, "probe_reward": 0.5, "probe_judge_accuracy": 0.30},
            {"images_seen": 32, "probe_reward": 0.6, "probe_judge_accuracy": 0.45},
            {"images_seen": 48, "probe_reward": 0.7, "probe_judge_accuracy": 0.44}]
    trainer.log_rows = [*rows, {"images_seen": 64}]  # an epoch without a probe
    assert trainer.probe_decline() is None  # within the tolerance of the best
    trainer.log_rows.append({"images_seen": 80, "probe_reward": 0.8, "probe_judge_accuracy": 0.40})
    msg = trainer.probe_decline()
    assert msg.startswith("the validation probe's probe_judge_accuracy peaked at 0.450 after 32 images and is "
                          "0.400 after 80") and "keep_probe_loras" in msg
    (tmp_path / "lora_probe_32.safetensors").write_bytes(b"")
    assert trainer.probe_decline().endswith(f"its LoRA: {tmp_path / 'lora_probe_32.safetensors'}")
    trainer.log_rows = [{k: v for k, v in r.items() if k != "probe_judge_accuracy"} for r in rows]
    assert trainer.probe_decline() is None  # no judge: the probe reward rose
