"""The shared rollout → loss path: training on a random subset of each trajectory's visited states
(`random_step_subset`, `AlgoConfig.train_fraction`) and rollouts with fewer steps than evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from agents.rollout import random_step_subset, transitions
from agents.trainer import PHASES, TrainConfig, Trainer
from test_algos import build, prepare, rollout_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_subset_keeps_round_fraction_of_each_rows_eligible_steps_and_nothing_else():
    eligible = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        keep = random_step_subset(eligible, 0.25, gen)
        assert not (keep & ~eligible).any()
        assert keep.sum(1).tolist() == [2, 1, 1]  # round(9/4) = 2, round(4/4) = 1, max(1, round(1/4)) = 1
    assert random_step_subset(eligible, 1.0, gen).equal(eligible)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_subset_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match=rf"fraction={fraction}: expected 0 < fraction <= 1"):
        random_step_subset(torch.ones(2, 4, dtype=torch.bool), fraction, torch.Generator())


def test_every_eligible_step_is_kept_with_probability_m_over_n():
    """Uniform inclusion (each of a row's n eligible steps with probability m/n) plus exactly m kept per row is
    what makes the mean over the kept steps an unbiased estimate of the mean over all of them."""
    eligible = torch.ones(4, 10, dtype=torch.bool)
    eligible[1, 7:] = False  # n = 7
    gen, draws = torch.Generator().manual_seed(1), 4000
    freq = sum(random_step_subset(eligible, 0.3, gen).double() for _ in range(draws)) / draws
    for row, n in enumerate(eligible.sum(1).tolist()):
        p = round(0.3 * n) / n
        sd = math.sqrt(p * (1 - p) / draws)
        assert (freq[row, :n] - p).abs().max() < 5 * sd, (row, freq[row])


def test_transitions_returns_exactly_the_kept_steps():
    algo, policy, env = build("grpo", "digits-flow", perturb=False)
    rollout = rollout_of(policy, env)
    full = transitions(rollout)
    rollout["train_steps"] = random_step_subset(rollout["stds"] > 0, 0.5, torch.Generator().manual_seed(0))
    sub = transitions(rollout)
    assert "train_steps" not in sub.keys()
    kept = {(i, k) for i, k in zip(sub["sample_index"].tolist(), sub["step_index"].tolist())}
    want = {tuple(ik) for ik in rollout["train_steps"].nonzero().tolist()}
    assert kept == want
    for i, k in kept:  # each kept row is the full set's row for that (sample, step)
        j = ((full["sample_index"] == i) & (full["step_index"] == k)).nonzero().item()
        assert torch.equal(sub["latents"][sub["sample_index"].eq(i) & sub["step_index"].eq(k)][0], full["latents"][j])


@pytest.mark.parametrize("name", ["grpo", "fdfo"])
def test_subset_loss_is_an_unbiased_estimate_of_the_full_loss(name):
    """The per-state losses are means over visited states: averaged over random subsets (same count per
    trajectory), the subset loss converges to the loss on every state (within 5 Monte-Carlo standard errors).
    The items are prepared at θ_old, then θ moves (ρ ≠ 1), as after an epoch's first optimizer step."""
    algo, policy, env = build(name, "digits-flow", num_envs=8)
    rollout = rollout_of(policy, env)
    items = prepare(algo, rollout.clone())
    eligible = rollout["stds"] > 0 if algo.visited_states == "stochastic" else torch.ones_like(rollout["stds"],
                                                                                               dtype=torch.bool)
    with torch.no_grad():
        for n, p in policy.denoiser.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.02)
        full = algo.loss(items)["loss_policy"].item()
        gen, values = torch.Generator().manual_seed(0), []
        for _ in range(300):
            keep = random_step_subset(eligible, 1 / 3, gen)[items["sample_index"], items["step_index"]]
            values.append(algo.loss(items[keep])["loss_policy"].item())
    v = torch.tensor(values, dtype=torch.float64)
    assert v.std() > 1e-3 * abs(full)  # the subsets differ
    assert abs(v.mean().item() - full) < 5 * v.std().item() / math.sqrt(len(v)), (v.mean().item(), full)


@pytest.mark.parametrize("name", ["nft", "fpo"])
def test_train_fraction_is_refused_by_algorithms_without_visited_states(name):
    with pytest.raises(ValueError, match=rf"{name} trains on forward-process draws.*expected 1.0"):
        build(name, "digits-flow", train_fraction=0.5)


def _cfg(out, images, **kw):
    over = {"images_per_epoch": 16, "group_size": 4, "minibatch_size": 8, "train_fraction": 0.5}
    return TrainConfig(algo="grpo", model="digits-flow", num_steps=3, images=images, out=str(out), seed=0,
                       progress=False, grid_every=0, algo_overrides={**over, **kw})


@pytest.mark.parametrize("fraction", [1.0, 0.5, 1 / 3])
def test_the_update_trains_on_the_fraction_of_states(tmp_path, fraction):
    """16 images per epoch: the update sees 16 · max(1, round(fraction · n)) transitions, n the stochastic steps."""
    trainer = Trainer(_cfg(tmp_path, 16, train_fraction=fraction))
    seen = []
    prepare_fn = trainer.algo.prepare
    trainer.algo.prepare = lambda rollout: seen.append(prepare_fn(rollout)) or seen[-1]
    trainer.train_epoch()
    trainer.folder.release()
    n = int((trainer.policy.sampler.stds > 0).sum())
    assert len(seen[0]) == 16 * max(1, round(fraction * n))


def test_phase_times_split_an_epoch(tmp_path):
    trainer = Trainer(_cfg(tmp_path, 16))
    trainer.phase_times = {}
    row = trainer.train_epoch()
    trainer.folder.release()
    assert set(trainer.phase_times) == set(PHASES)
    assert all(v > 0 for v in trainer.phase_times.values())
    # the training phases lie inside the epoch's wall time (diagnostics are measured after it)
    assert sum(v for k, v in trainer.phase_times.items() if k != "diagnostics") <= row["wall_time_s"] + 1e-3


def test_probes_sample_at_eval_num_steps(tmp_path):
    """Rollouts at 2 steps, probes at 4: the probe is the 4-step sampler's reward of the trained LoRA."""
    from diffenv.metrics import PROBE_BATCH, PROBE_REPEATS, PROBE_SEED
    from diffenv.sampling import generate

    cfg = _cfg(tmp_path, 16, train_fraction=1.0)
    cfg.num_steps, cfg.eval_num_steps, cfg.probe_every, cfg.probe_images = 2, 4, 1, 20
    trainer = Trainer(cfg)
    row = trainer.train()[-1]
    assert trainer.policy.num_steps == 2
    kw = dict(batch_size=PROBE_BATCH, seed=PROBE_SEED, condition_repeats=PROBE_REPEATS, reward=cfg.reward,
              model=trainer.policy.backend, guidance_scale=1.0)
    at4 = generate(cfg.probe_images, num_steps=4, **kw)
    assert at4.nfe_per_image == 4
    assert row["probe_reward"] == pytest.approx(at4.rewards.mean().item(), abs=0, rel=0)
