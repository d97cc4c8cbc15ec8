"""Learning curves and checkpoint selection: interpolation on synthetic curves, the CI over seeds, and a
selection that never reads the test set."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from agents.benchmark.curves import (CurvePoint, images_to_reach, pareto_front, probe_curve, select_checkpoint,
                                     summarise)

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"images_per_epoch": 8, "group_size": 4, "minibatch_size": 8}


def curve(*points) -> list[CurvePoint]:
    return [CurvePoint(*p) for p in points]


# ------------------------------------------------------------------ images to reach
def test_reached_is_interpolated_between_the_probe_before_and_the_first_at_the_target():
    c = curve((64, 0.5, 10.0), (128, 0.7, 10.0), (192, 0.9, 10.0))
    assert images_to_reach(c, 0.8, 12.0, lower_is_better=True) == pytest.approx(160.0)
    assert images_to_reach(c, 0.9, 12.0, lower_is_better=True) == pytest.approx(192.0)  # exactly at a probe
    assert images_to_reach(c, 0.4, 12.0, lower_is_better=True) == 64.0  # at the first probe: nothing before it
    assert images_to_reach(list(reversed(c)), 0.8, 12.0, lower_is_better=True) == pytest.approx(160.0)


def test_not_reached():
    c = curve((64, 0.5, 10.0), (128, 0.9, 10.0))
    assert images_to_reach(c, 0.95, 12.0, lower_is_better=True) is None
    assert images_to_reach(c, 0.8, 9.0, lower_is_better=True) is None  # the score, never at that diversity
    assert images_to_reach([], 0.8, 9.0, lower_is_better=True) is None


def test_non_monotone_curves_count_their_first_crossing():
    c = curve((64, 0.5, 1.0), (128, 0.9, 1.0), (192, 0.6, 1.0), (256, 0.95, 1.0))
    assert images_to_reach(c, 0.8, 1.0, lower_is_better=True) == pytest.approx(112.0)  # not the crossing at 256


def test_diversity_must_be_no_worse_than_the_targets():
    # lower is better (FD): the score is reached at 128 but FD 15 > 12; at 192 both hold. On the segment the score
    # holds throughout and FD falls 15 -> 11, crossing 12 three quarters of the way: 176 images
    c = curve((64, 0.5, 10.0), (128, 0.9, 15.0), (192, 0.95, 11.0))
    assert images_to_reach(c, 0.8, 12.0, lower_is_better=True) == pytest.approx(176.0)
    # higher is better (within-prompt distance): the mirror image
    c = curve((64, 0.5, 0.30), (128, 0.9, 0.10), (192, 0.95, 0.26))
    assert images_to_reach(c, 0.8, 0.22, lower_is_better=False) == pytest.approx(176.0)
    # the later condition decides: score crosses 0.8 at 25 % of the segment, diversity at 75 %
    c = curve((0, 0.7, 0.0), (100, 1.1, 1.0))
    assert images_to_reach(c, 0.8, 0.75, lower_is_better=False) == pytest.approx(75.0)
    assert images_to_reach(c, 1.0, 0.25, lower_is_better=False) == pytest.approx(75.0)
    # NaN diversity is never "no worse"
    assert images_to_reach(curve((64, 0.9, math.nan)), 0.8, 1.0, lower_is_better=True) is None


# ------------------------------------------------------------------ mean ± 95 % CI over seeds
def test_student_t_interval_on_known_values():
    s = summarise([100.0, 200.0, 300.0])
    # mean 200, sd 100, t(0.975, 2) = 4.302653: half-width 4.302653 * 100 / sqrt(3)
    assert (s.n, s.reached, s.mean) == (3, 3, 200.0)
    assert s.half_width == pytest.approx(4.302653 * 100 / math.sqrt(3), rel=1e-6)
    assert str(s) == "200 ± 248"
    assert summarise([5.0] * 30).half_width == 0.0


def test_not_reached_seeds_are_counted_never_averaged_in():
    s = summarise([100.0, None, 300.0])
    assert (s.n, s.reached, s.mean) == (3, 2, 200.0)
    assert s.half_width == pytest.approx(12.706205 * 100 * math.sqrt(2) / math.sqrt(2), rel=1e-6)
    assert "the 2 that reached it" in str(s)
    one = summarise([None, 150.0])
    assert one.reached == 1 and math.isnan(one.half_width) and str(one) == "150 (the 1 that reached it)"
    none = summarise([None, None, None])
    assert none.reached == 0 and math.isnan(none.mean) and str(none) == "not reached"


# ------------------------------------------------------------------ checkpoint selection
def test_selection_is_the_last_checkpoint_on_the_validation_pareto_front():
    c = curve((64, 0.80, 10.0), (128, 0.90, 12.0), (192, 0.85, 13.0))  # 192 is worse than 128 on both axes
    assert pareto_front(c, lower_is_better=True) == c[:2]
    assert select_checkpoint(c, lower_is_better=True) == c[1]
    c = curve((64, 0.80, 0.30), (128, 0.90, 0.20), (192, 0.95, 0.10))  # a trade-off: all on the front
    assert select_checkpoint(c, lower_is_better=False) == c[2]
    c = curve((64, 0.90, 0.30), (128, 0.90, 0.30))  # equal points: the later one
    assert select_checkpoint(c, lower_is_better=False) == c[1]
    assert select_checkpoint(curve((64, 0.9, math.nan), (128, 0.5, 1.0)), lower_is_better=True).images == 128
    with pytest.raises(ValueError, match="no probe point"):
        select_checkpoint([], lower_is_better=True)


def test_selection_sees_only_validation_points():
    assert list(inspect.signature(select_checkpoint).parameters) == ["validation", "lower_is_better"]
    rows = [{"epoch": "1", "images_seen": "8", "probe_judge_accuracy": "0.5", "probe_fd": "3.0"},
            {"epoch": "2", "images_seen": "16", "probe_judge_accuracy": "", "probe_fd": ""},
            {"epoch": "3", "images_seen": "24", "probe_judge_accuracy": "0.75", "probe_fd": "2.5"}]
    assert probe_curve(rows, "probe_judge_accuracy", "probe_fd") == curve((8, 0.5, 3.0), (24, 0.75, 2.5))


# ------------------------------------------------------------------ the trainer and compare
def test_trainer_keeps_probe_loras_and_resumes_exactly(tmp_path):
    from agents.trainer import TrainConfig, Trainer

    def config(out, images):
        return TrainConfig(algo="grpo", model="digits-flow", num_steps=2, images=images, out=str(out), seed=0,
                           progress=False, grid_every=0, probe_every=2, probe_images=20, keep_probe_loras=True,
                           algo_overrides=SMALL)

    Trainer(config(tmp_path / "a", 32)).train()
    Trainer(config(tmp_path / "b", 16)).train()
    Trainer(config(tmp_path / "b", 32), resume=True).train()
    kept = sorted(p.name for p in (tmp_path / "a").glob("lora_probe_*"))
    assert kept == ["lora_probe_16.safetensors", "lora_probe_32.safetensors", "lora_probe_8.safetensors"]
    for name in kept:  # probes at epoch 1 and every 2nd epoch, bit-identical across the resume
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "lora_probe_32.safetensors").read_bytes() == (tmp_path / "a" / "lora.safetensors"
                                                                           ).read_bytes()
    off = TrainConfig(algo="grpo", model="digits-flow", num_steps=2, images=8, out=str(tmp_path / "c"),
                      progress=False, grid_every=0, probe_every=1, probe_images=20, algo_overrides=SMALL)
    Trainer(off).train()
    assert not list((tmp_path / "c").glob("lora_probe_*")), "off by default"


def tiny_task(**kw):
    from agents.benchmark.compare import Task

    return Task(**{**dict(name="t", model="digits-flow", num_steps=2, algos=["grpo"], budgets=[16, 32], seeds=[0, 1],
                          cfg_scales=[1.0, 2.0], best_of_n=[2], eval_images=20, probe_every=1, probe_images=20,
                          algo_overrides={"grpo": SMALL}), **kw})


def test_cfg_probe_points_use_the_trainers_probe_protocol(tmp_path):
    """The base model (zero LoRA) through the trainer's probe and compare's CFG probe at w = 1: the same numbers."""
    from agents.benchmark.evaluation import entry_metrics, eval_probe
    from agents.trainer import TrainConfig, Trainer

    task = tiny_task()
    trainer = Trainer(TrainConfig(algo="grpo", model=task.model, num_steps=task.num_steps, images=8,
                                  out=str(tmp_path), progress=False, probe_images=task.probe_images,
                                  algo_overrides=SMALL))
    try:
        probe = trainer.probe()
    finally:
        trainer.folder.release()
    cfg = entry_metrics(eval_probe(task, task.model, 1.0), task)
    for k in ("reward", "judge_accuracy", "judge_log_prob", "fd"):
        assert probe[f"probe_{k}"] == pytest.approx(cfg["reward_mean" if k == "reward" else k], rel=1e-5), k


def test_test_set_must_not_share_noise_seeds_with_the_probe_set():
    with pytest.raises(ValueError, match=r"eval_seed=999: the test set's noise seeds include \[999\]"):
        tiny_task(eval_seed=999).validate()
    tiny_task(eval_seed=998).validate()  # 20 test images: one batch, seed 998
    with pytest.raises(ValueError, match=r"noise seeds include \[999\]"):  # 300 images: batches 998 and 999
        tiny_task(eval_seed=998, eval_images=300).validate()


def test_compare_evaluates_only_the_selected_probe_checkpoint_on_the_test_set(tmp_path, monkeypatch):
    import csv

    import diffenv.models
    from agents.benchmark.compare import Comparison
    from agents.benchmark.report import read_log

    loaded = []
    real = diffenv.models.load_tuned_backend

    def record(model, lora, *a, **k):
        loaded.append(lora.name)
        return real(model, lora, *a, **k)

    monkeypatch.setattr(diffenv.models, "load_tuned_backend", record)  # compare's test-set evaluations of LoRAs
    # the timing pass loads every LoRA again to time its sampling (tests/test_timing.py); it scores none of them
    monkeypatch.setattr(Comparison, "time_entries", lambda self, task, rows: None)
    task = tiny_task()
    Comparison([task], tmp_path, progress=False).run()
    runs = tmp_path / "runs" / "t" / "grpo"
    expected = []
    for seed in task.seeds:
        assert len(list((runs / f"seed{seed}").glob("lora_probe_*"))) == 4  # every probe's checkpoint is kept ...
        chosen = select_checkpoint(probe_curve(read_log(runs / f"seed{seed}" / "log.csv"), "probe_judge_accuracy",
                                               "probe_fd"), lower_is_better=True)
        expected += ["lora_16.safetensors", "lora_32.safetensors", f"lora_probe_{int(chosen.images)}.safetensors"]
    assert loaded == expected  # ... and only the one chosen on the probe rows reaches the test set, once
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["budget"] for r in rows if r["kind"] == "selected"] == [e.split("_")[-1].split(".")[0]
                                                                       for e in expected[2::3]]
    assert not [r for r in rows if r["kind"] == "cfg_probe"], "the probe (validation) rows stay out of the results"
    md = (tmp_path / "results.md").read_text()
    assert "| algo | reached | images to reach |" in md and "| grpo | " in md
    assert (tmp_path / "curves_t.png").is_file()
    loaded.clear()
    Comparison([task], tmp_path, progress=False).run()  # cached: nothing is evaluated again
    assert loaded == []


def test_probe_conditions_repeat_so_per_prompt_diversity_is_defined():
    """A probe of 200 images over the 1,155 `shapes` training prompts would give each prompt at most one image and a
    NaN within-prompt distance; the probe draws ≤ n // PROBE_REPEATS prompts (seeded) instead. Small sets (digits'
    10 classes) keep the plain balanced cycle."""
    from diffenv.metrics import PROBE_REPEATS, PROBE_SEED
    from diffenv.sampling import balanced_conditions, repeated_conditions

    assert torch.equal(repeated_conditions(200, list(range(10)), PROBE_REPEATS, PROBE_SEED),
                       balanced_conditions(200, list(range(10))))
    ids = list(range(3, 1158))
    c = repeated_conditions(200, ids, PROBE_REPEATS, PROBE_SEED)
    counts = torch.bincount(c)
    assert len(c) == 200 and int((counts > 0).sum()) == 50 and int(counts[counts > 0].min()) == PROBE_REPEATS
    assert set(c.tolist()) <= set(ids)
    assert torch.equal(c, repeated_conditions(200, ids, PROBE_REPEATS, PROBE_SEED))
    assert not torch.equal(c, repeated_conditions(200, ids, PROBE_REPEATS, PROBE_SEED + 1))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        repeated_conditions(10, ids, 0, 0)


# ------------------------------------------------------------------ the targets' verdicts (report.targets)
def _agg(entry, kind, acc, fd, nfe, guidance=1.0, budget=""):
    return {"task": "t", "entry": entry, "kind": kind, "judge_accuracy": acc, "fd": fd, "nfe_per_image": nfe,
            "guidance_scale": guidance, "budget": budget}


CFG_POINTS = [_agg("cfg w=1", "cfg", 0.90, 40.0, 3), _agg("cfg w=1.5", "cfg", 0.93, 35.0, 6, 1.5),
              _agg("cfg w=3", "cfg", 0.77, 46.0, 6, 3.0), _agg("grpo @4096", "rl", 0.99, 20.0, 3, budget=4096)]


def test_dominance_needs_judge_and_diversity_against_every_cfg_point_above_one():
    from diffenv.metrics import DIGITS
    from agents.benchmark.report import targets

    good = _agg("grpo selected", "selected", 0.95, 30.0, 3)
    sharp = _agg("ddpo selected", "selected", 0.99, 36.0, 3)  # better judge, worse FD than w=1.5
    text = targets(CFG_POINTS + [good, sharp], "t", DIGITS, {})
    assert "**met**: `grpo selected`" in text[0] and "ddpo" not in text[0]
    text = targets(CFG_POINTS + [sharp], "t", DIGITS, {})
    assert "**not met**" in text[0] and "`cfg w=1.5` (0.930, 35.00)" in text[0] and "cfg w=3" not in text[0]
    # w = 1 is the unguided base, not a CFG point to dominate: a model worse than it may still meet the target
    assert "**met**" in targets(CFG_POINTS[1:] + [_agg("x selected", "selected", 0.93, 35.0, 3)], "t", DIGITS, {})[0]


def test_sample_efficiency_ratio_against_ddpo():
    from diffenv.metrics import DIGITS
    from agents.benchmark.report import targets

    rows = CFG_POINTS + [_agg("grpo selected", "selected", 0.95, 30.0, 3)]
    fast, slow = summarise([200.0, 300.0, 250.0]), summarise([900.0, 700.0, 800.0])
    text = targets(rows, "t", DIGITS, {"grpo": fast, "ddpo": slow})[1]
    assert "**met**" in text and "3.2× fewer" in text
    text = targets(rows, "t", DIGITS, {"grpo": fast, "ddpo": summarise([500.0, 500.0, 500.0])})[1]
    assert "**not met**" in text and "2.0× fewer" in text
    # a DDPO that never reaches the target: the ratio is a lower bound from the largest budget (4096 / 250)
    text = targets(rows, "t", DIGITS, {"grpo": fast, "ddpo": summarise([None, None, 700.0])})[1]
    assert "≥ 16.4× fewer (only 1/3 ddpo seeds reach it within 4096)" in text
    # a DDPO already there at its first probe: no ratio is measurable, and the line says so
    text = targets(rows, "t", DIGITS, {"ddpo": summarise([64.0, 64.0])}, {"ddpo": 64.0})[1]
    assert "**not met**" in text and "1.0× fewer" in text and "at its first probe (64 images)" in text
    # an algorithm counts only where every seed reached the target
    assert "no algorithm reaches" in targets(rows, "t", DIGITS, {"grpo": summarise([None, 100.0])})[1]
