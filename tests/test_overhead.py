"""The orchestration share a sweep prints and logs (sweeps.results): a trial's wall time as the
driver saw it, outside the latency measurement, training and evaluation the trial reported."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from sweeps import results


def table(rows):
    t = pd.DataFrame(rows, columns=["wall_s", "work_s", "resumed_from_epoch"])
    t["overhead_share"] = results.overhead_shares(t)
    return t


def test_shares_per_trial_and_over_the_sweep():
    t = table([(100.0, 90.0, 0), (50.0, 49.0, 0), (10.0, 12.0, 0)])  # a clock skew never gives a negative share
    assert t["overhead_share"].tolist() == pytest.approx([0.10, 0.02, 0.0])
    assert results.overhead_total(t) == pytest.approx(1 - 151 / 160)
    line = results.overhead_summary(t)
    assert line.startswith("orchestration share: 5.6% of trial wall time (9 s of 160 s")
    assert "3 trials; per trial median 2.0%, max 10.0%" in line


def test_resumed_or_unmeasured_trials_are_left_out():
    t = table([(100.0, 80.0, 0), (5000.0, 60.0, 2), (None, 10.0, 0), (30.0, None, 0), (0.0, 0.0, 0)])
    assert t["overhead_share"].notna().tolist() == [True, False, False, False, False]
    assert results.overhead_total(t) == pytest.approx(0.2)
    empty = table([(None, 1.0, 0)])
    assert math.isnan(results.overhead_total(empty))
    assert "no trial with both" in results.overhead_summary(empty)


def test_slot_use_counts_the_gaps_between_trials():
    t = pd.DataFrame({"started_s": [0.0, 0.0, 60.0], "ended_s": [50.0, 60.0, 100.0], "work_s": [45.0, 55.0, 35.0]})
    # 2 slots x 100 s, 135 s of work: the gap 50..60 in the first slot and the overheads make the rest
    assert results.slot_use_summary(t, 2).startswith("trial slots: 67.5% of 2 x 100 s")
    assert results.slot_use_summary(t.iloc[:0], 2) == "trial slots: no finished trial"


def test_a_table_without_the_columns():
    t = pd.DataFrame({"wall_s": [10.0]})
    assert results.overhead_shares(t).isna().all()
