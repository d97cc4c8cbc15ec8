"""The independent digits judge `digit_judge_indep` and the report's reward–judge agreement flags."""

from __future__ import annotations

import json
import math

import pytest
import torch

import rewards
from agents.benchmark.report import BASE_ENTRY, agreement_flags, agreement_summary, aggregate, write_outputs
from diffenv.data import load_digits_split, split_indices, to_unit
from rewards.classifier import WEIGHTS_DIR
from rewards.independent_judge import IndependentDigitJudge


@pytest.fixture(scope="module")
def judge():
    return rewards.make("digit_judge_indep", mode="log_prob")


def test_loads_from_safetensors_and_is_deterministic(judge):
    from safetensors.torch import load_file

    assert isinstance(judge.network, IndependentDigitJudge)
    stored = load_file(str(WEIGHTS_DIR / "digit_judge_indep.safetensors"))
    for key, value in judge.network.state_dict().items():
        assert torch.equal(stored[key], value), key
    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    conditions = torch.arange(32) % 10
    again = rewards.make("digit_judge_indep", mode="log_prob")
    assert torch.equal(judge(images, conditions), again(images, conditions))
    assert torch.equal(judge(images, conditions), judge(images, conditions))


def test_trained_only_on_digits_the_reward_never_saw():
    config = json.loads((WEIGHTS_DIR / "digit_judge_indep.json").read_text())
    fit_rows, reward_rows = set(config["fit_rows"]), set(split_indices("train").tolist())
    assert len(fit_rows) == 360 and fit_rows == set(split_indices("test").tolist())
    assert not fit_rows & reward_rows  # the reward (and digit_judge, and the diffusion models) train on these
    assert "train split" in json.loads((WEIGHTS_DIR / "digit_classifier.json").read_text())["trained_on"]


def test_beats_chance_widely_on_held_out_real_digits(judge):
    images, labels = load_digits_split("train")  # the judge's held-out data
    correct = rewards.make("digit_judge_indep", mode="correct")(to_unit(images), labels)
    assert correct.mean() > 0.95  # chance is 0.10
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert rewards.make("digit_judge_indep", mode="correct")(noise, torch.arange(200) % 10).mean() < 0.3


def test_calibration_metrics_are_stored():
    metrics = json.loads((WEIGHTS_DIR / "digit_judge_indep_metrics.json").read_text())
    for key in ("heldout_accuracy", "heldout_nll", "heldout_nll_uncalibrated", "heldout_ece",
                "heldout_ece_uncalibrated", "temperature", "train_seconds"):
        assert math.isfinite(metrics[key]), key
    assert metrics["heldout_nll"] <= metrics["heldout_nll_uncalibrated"]  # the temperature was fit for this
    assert 0 <= metrics["heldout_ece"] < 0.05 and metrics["heldout_accuracy"] > 0.95


def test_indep_metrics_separate_real_digits_from_noise():
    from diffenv.metrics import DIGITS, indep_metrics

    x, y = load_digits_split("train")
    real = indep_metrics(to_unit(x[:500]), y[:500])
    noise = indep_metrics(torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)), y[:500])
    assert real["indep_accuracy"] > 0.95 and noise["indep_accuracy"] < 0.3
    assert real["indep_fd"] < noise["indep_fd"] / 10
    assert {"indep_accuracy", "indep_fd"} <= {k for k, _ in DIGITS.columns}


def _row(entry, kind, reward, indep, fd=1.0, **extra):
    return {"task": "t", "entry": entry, "kind": kind, "algo": "grpo" if kind == "rl" else "", "seed": 0,
            "guidance_scale": 1.0, "budget": 256, "reward_mean": reward, "indep_accuracy": indep, "indep_fd": fd,
            "judge_accuracy": 0.99, "fd": 1.0, **extra}


def _agg(rows):
    return {r["entry"]: r for r in aggregate([{k: str(v) for k, v in r.items()} for r in rows])}


def test_agreement_flag_fires_when_only_the_reward_rises():
    agg = _agg([_row(BASE_ENTRY, "cfg", 0.90, 0.970, 1.0),
                _row("hacked", "rl", 0.97, 0.968, 1.1),  # reward +0.07, judge −0.002
                _row("honest", "rl", 0.97, 0.985, 1.2),  # both rise: +0.015 ≥ 0.25 · min(0.07, 0.03)
                _row("collapsed", "rl", 0.95, 0.980, 2.5),  # judge fine, but its FD ×2.5
                _row("flat", "rl", 0.905, 0.960, 1.0)])  # reward +0.005: too small a gain to judge
    base = agg[BASE_ENTRY]
    assert any("not matched" in f for f in agreement_flags(agg["hacked"], base))
    assert agreement_flags(agg["honest"], base) == []
    assert agreement_flags(agg["collapsed"], base) == ["indep FD 1.00->2.50"]
    assert agreement_flags(agg["flat"], base) == []
    summary = agreement_summary(list(agg.values()), "t")
    assert "1/4 RL entries" in summary and "hacked +0.070/-0.002" in summary


def test_report_tolerates_results_without_the_new_columns(tmp_path):
    from types import SimpleNamespace

    rows = [_row(BASE_ENTRY, "cfg", 0.90, 0.97), _row("cfg w=3", "cfg", 0.95, 0.98),
            _row("grpo @256", "rl", 0.97, 0.96)]
    old = [{k: str(v) for k, v in r.items() if k not in ("indep_accuracy", "indep_fd")} for r in rows]
    agg = aggregate(old)
    assert all(math.isnan(r["indep_accuracy"]) for r in agg)
    assert agreement_flags(next(r for r in agg if r["kind"] == "rl"), agg[0]) == []
    assert agreement_summary(agg, "t") == ""
    task = SimpleNamespace(name="t", model="sd:none", reward="r", num_steps=3, eval_images=10, eval_seed=0,
                           seeds=[0], algos=[])
    write_outputs(old, [task], tmp_path)  # a task without a protocol: no plots that need models
    md = (tmp_path / "results.md").read_text()
    assert "| grpo @256 | 1 |" in md and "not matched" not in md
