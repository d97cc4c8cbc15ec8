"""Interleaved timing of a comparison's entries (`agents.benchmark.timing`)."""

from __future__ import annotations

import math

import pytest

from agents.benchmark import timing


def test_every_entry_runs_once_per_round_in_a_rotated_order_after_a_warm_up(monkeypatch):
    calls, clock = [], iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    entries = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    seconds = timing.interleaved_seconds(entries, rounds=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then rotated rounds
    assert seconds == {"a": 1, "b": 1, "c": 1}  # each timed call spans one tick of the fake clock


def test_the_median_round_is_reported(monkeypatch):
    ticks = iter([0, 5, 10, 11, 20, 22])  # one entry: rounds of 5, 1 and 2 seconds
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    assert timing.interleaved_seconds({"a": lambda: None}, rounds=3) == {"a": 2}
    with pytest.raises(ValueError, match="rounds=0: expected >= 1"):
        timing.interleaved_seconds({"a": lambda: None}, rounds=0)


def test_apply_timings_sets_ms_per_image_and_the_ratio_to_the_base():
    rows = [{"entry": "cfg w=1"}, {"entry": "cfg w=3"}, {"entry": "grpo @64", "ms_per_image": 99.0}, {"entry": "x"}]
    timing.apply_timings(rows, {"cfg w=1": 0.010, "cfg w=3": 0.021, "grpo @64": 0.0105}, lambda r: r["entry"],
                         "cfg w=1")
    assert [r.get("ms_per_image") for r in rows] == pytest.approx([10.0, 21.0, 10.5, None])
    assert [r.get("time_vs_base") for r in rows[:3]] == pytest.approx([1.0, 2.1, 1.05])
    assert "time_vs_base" not in rows[3]


def test_apply_timings_adds_the_ratio_to_a_cfg_entry_when_named():
    rows = [{"entry": "cfg w=1"}, {"entry": "cfg w=5"}, {"entry": "lora"}]
    timing.apply_timings(rows, {"cfg w=1": 0.010, "cfg w=5": 0.020, "lora": 0.011}, lambda r: r["entry"],
                         "cfg w=1", cfg_key="cfg w=5")
    assert [r["time_vs_cfg"] for r in rows] == pytest.approx([0.5, 1.0, 0.55])
    assert [r["time_vs_base"] for r in rows] == pytest.approx([1.0, 2.0, 1.1])
    timing.apply_timings(rows, {"lora": 0.011}, lambda r: r["entry"], "cfg w=1", cfg_key="cfg w=5")
    assert math.isnan(rows[2]["time_vs_cfg"]) and math.isnan(rows[2]["time_vs_base"])  # reference not timed
