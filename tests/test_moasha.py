"""MO-ASHA decisions on synthetic trial streams (sweeps.moasha.ParetoRungs, pure), and its Tune
adapter's write-through state surviving a driver kill (sweeps.scheduler.ParetoASHA, no cluster).

Values are (top1 max, latency_ms min) unless said otherwise; `eta` sets how many of the n trials
at a rung go on: ceil(n / eta), counted with the newcomer."""
from __future__ import annotations

import json
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.schedulers import TrialScheduler

from sweeps.moasha import CONTINUE, STOP, ParetoRungs, crowding_distance, order, rung_steps
from sweeps.scheduler import ParetoASHA

MO = ["max", "min"]


def rungs(eta=2.0, steps=(1, 2), tie_break="hv"):
    return ParetoRungs(list(steps), eta, MO, tie_break)


@pytest.mark.parametrize("grace, eta, max_t, expected", [(1, 2, 4, [1, 2]), (1, 3, 9, [1, 3]), (2, 2, 16, [2, 4, 8]),
                                                         (1, 2, 2, [1]), (1, 1.5, 4, [1, 2, 3]), (4, 2, 4, [])])
def test_rung_steps(grace, eta, max_t, expected):
    assert rung_steps(grace, eta, max_t) == expected


@pytest.mark.parametrize("args", [(0, 2, 4), (1, 1, 4), (1, 0.5, 4)])
def test_rung_steps_rejects_bad_settings(args):
    with pytest.raises(ValueError):
        rung_steps(*args)


def test_geometric_refuses_a_grace_past_the_budget():
    with pytest.raises(ValueError, match="no rung below the full budget 4"):
        ParetoRungs.geometric(4, 2, 4, MO)


@pytest.mark.parametrize("kwargs, match", [(dict(rungs=[], eta=2), "increasing"), (dict(rungs=[2, 1], eta=2), "increasing"),
                                           (dict(rungs=[1], eta=1), "eta"), (dict(rungs=[1], eta=2, tie_break="x"), "tie_break")])
def test_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParetoRungs(directions=MO, **kwargs)


def test_rank_promotion_keeps_the_top_half_by_pareto_rank():
    r = rungs(eta=2)
    assert r.on_result("a", 1, [70, 5]) == CONTINUE     # alone at the rung: 1 of ceil(1/2) = 1
    assert r.on_result("b", 1, [60, 6]) == STOP         # dominated by a: place 2 of 2, keep 1
    assert r.on_result("c", 1, [80, 9]) == CONTINUE     # non-dominated with a: rank 0, place <= 2 of keep 2
    assert r.on_result("d", 1, [65, 5.5]) == STOP       # rank 1 (behind a), a and c take the 2 places
    assert r.on_result("e", 1, [90, 1]) == CONTINUE     # dominates everyone
    assert r.stopped == {"b": {"step": 1, "values": [60.0, 6.0]}, "d": {"step": 1, "values": [65.0, 5.5]}}
    # epochs between rungs and after the last one: no decision, keep going
    assert r.on_result("a", 1.5, [71, 5]) == CONTINUE and r.rung_sizes() == {1: 5, 2: 0}
    assert r.on_result("a", 2, [72, 5]) == CONTINUE     # first at rung 2
    assert r.on_result("c", 2, [70, 9]) == STOP         # dominated by a at rung 2 (a: 72 @ 5)
    assert r.on_result("e", 3, [95, 1]) == CONTINUE     # past the last rung, recorded at rung 2 (the highest passed)
    assert r.rung_sizes() == {1: 5, 2: 3}
    assert r.on_result("e", 4, [96, 1]) == CONTINUE     # already recorded at rung 2: the same answer, no new record
    assert r.rung_sizes() == {1: 5, 2: 3}


def test_a_stopped_trial_stays_stopped_and_decisions_replay():
    r = rungs(eta=2)
    r.on_result("a", 1, [70, 5])
    assert r.on_result("b", 1, [60, 6]) == STOP
    assert r.on_result("b", 1, [99, 0.1]) == STOP       # the same rung reported again (resumed trial)
    assert r.on_result("b", 2, [99, 0.1]) == STOP       # ... or a later one: stopped is final
    assert r.stopped_early("b") and not r.stopped_early("a")
    assert r.records[1]["b"][:2] == [60.0, 6.0]         # the first report at a rung is the one kept


def test_identical_values_tie_by_arrival():
    r = rungs(eta=2)
    assert r.on_result("first", 1, [70, 5]) == CONTINUE
    assert r.on_result("second", 1, [70, 5]) == STOP    # same rank, zero HV contribution each: arrival decides
    r3 = rungs(eta=1.5)                                  # keep ceil(2 / 1.5) = 2: both go on
    assert r3.on_result("first", 1, [70, 5]) == CONTINUE
    assert r3.on_result("second", 1, [70, 5]) == CONTINUE


# three mutually non-dominated points in minimisation form (as the rule sees -top1, latency):
# A = (0, 10), B = (5, 5), C = (10, 0); reference beyond the worst: (11, 11).
# HV contributions: A 5, B 25, C 5. Crowding distances: A inf, B 2, C inf.
A, B, C = [0.0, 10.0], [5.0, 5.0], [10.0, 0.0]


def test_hv_contribution_breaks_ties_within_a_rank():
    r = ParetoRungs([1], 3, ["min", "min"], tie_break="hv")   # keep ceil(3 / 3) = 1
    assert r.on_result("A", 1, A) == CONTINUE
    assert r.on_result("C", 1, C) == STOP               # 2 at the rung, keep 1: equal contributions, later arrival
    assert r.on_result("B", 1, B) == CONTINUE           # the largest contribution of the front
    r2 = ParetoRungs([1], 3, ["min", "min"], tie_break="hv")
    r2.on_result("C", 1, C)
    r2.on_result("B", 1, B)
    assert r2.on_result("A", 1, A) == STOP              # A and C tie at 5 behind B


def test_crowding_distance_breaks_ties_the_nsga2_way():
    r = ParetoRungs([1], 3, ["min", "min"], tie_break="crowding")
    r.on_result("A", 1, A)
    r.on_result("C", 1, C)
    assert r.on_result("B", 1, B) == STOP               # the boundary points (infinite distance) go first
    assert list(crowding_distance(np.array([A, B, C]))) == [math.inf, 2.0, math.inf]


def test_infeasible_ranks_below_feasible():
    r = rungs(eta=2)
    assert r.on_result("feasible", 1, [50, 9]) == CONTINUE
    # dominates in both objectives but violates a constraint: placed after every feasible trial
    assert r.on_result("over-budget", 1, [90, 1], violation=0.5) == STOP
    assert r.on_result("feasible2", 1, [60, 8]) == CONTINUE   # 3 at the rung, keep 2: both feasible ones


def test_infeasible_trials_are_ordered_by_violation():
    r = rungs(eta=2)
    assert r.on_result("bad", 1, [90, 1], violation=3.0) == CONTINUE  # alone: goes on (nothing better arrived)
    assert r.on_result("less-bad", 1, [10, 50], violation=1.0) == CONTINUE  # 2 at the rung, smaller violation first
    assert r.on_result("worst", 1, [99, 0.1], violation=5.0) == STOP


def test_non_finite_values_rank_last():
    values = np.array([[np.nan, 1.0], [-50.0, 9.0], [-90.0, np.inf], [-60.0, 5.0]])
    assert list(order(values, np.array([0.0, 0.0, 0.0, 2.0]))) == [1, 3, 0, 2]
    r = rungs(eta=2)
    r.on_result("ok", 1, [50, 9])
    assert r.on_result("diverged", 1, [float("nan"), 1.0]) == STOP
    assert r.on_result("no-latency", 1, [99, None]) == STOP


def test_asynchronous_arrivals_decide_with_what_has_arrived():
    """Trials reach rungs at different times; each decision uses exactly the trials already at that
    rung (ASHA), so the order of arrival matters and nothing waits for a full bracket."""
    r = rungs(eta=2, steps=(1, 2))
    log = [("t1", 1, [60, 5], CONTINUE),   # rung 1: {t1}
           ("t1", 2, [65, 5], CONTINUE),   # rung 2: {t1} -- t1 climbs before anyone else arrives
           ("t2", 1, [70, 5], CONTINUE),   # rung 1: {t1, t2}, t2 dominates t1
           ("t3", 1, [58, 5], STOP),       # rung 1: {t1, t2, t3} keep 2: t2 (rank 0), t1 (rank 1); t3 rank 2
           ("t2", 2, [71, 5], CONTINUE),   # rung 2: {t1, t2}, t2 dominates
           ("t4", 1, [80, 4], CONTINUE),   # rung 1: 4 at the rung, t4 best
           ("t4", 2, [64, 4], CONTINUE)]   # rung 2: {t1 65@5, t2 71@5, t4 64@4}: t4 non-dominated (fastest), keep 2
    for trial, step, values, expected in log:
        assert r.on_result(trial, step, values) == expected, (trial, step)
    assert r.rung_sizes() == {1: 4, 2: 3}
    # the same reports in another order give other decisions: t3 first at the rung goes on
    r2 = rungs(eta=2, steps=(1, 2))
    assert r2.on_result("t3", 1, [58, 5]) == CONTINUE


def test_state_round_trips_through_json():
    r = rungs(eta=2)
    for i, (top1, lat) in enumerate([(70, 5), (60, 6), (80, 9), (65, 5.5)]):
        r.on_result(f"t{i}", 1, [top1, lat], violation=0.1 * (i == 3))
    r.on_result("t0", 2, [72, 5])
    back = ParetoRungs.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.to_dict() == r.to_dict()
    assert back.on_result("t4", 1, [75, 7]) == r.on_result("t4", 1, [75, 7])
    with pytest.raises(ValueError, match="differ"):
        rungs(steps=(1, 3)).merge(r.to_dict())


# ---------------------------------------------------------------- the Tune adapter

def trial(trial_id):
    """What ParetoASHA reads of Tune's Trial: its id."""
    return SimpleNamespace(trial_id=trial_id)


def result(epoch, top1, latency, violation=(0.0, 0.0)):
    return {"epoch": epoch, "top1": top1, "latency_ms": latency, "constraint_violation": list(violation)}


def adapter(path):
    return ParetoASHA(rungs(eta=2), metrics=["top1", "latency_ms"], state_path=str(path))


def test_adapter_returns_tune_decisions_and_writes_through(tmp_path):
    path = tmp_path / "pareto_asha.json"
    s = adapter(path)
    assert s.set_search_properties(None, None)  # Tune's metric/mode do not override its own
    assert s.on_trial_result(None, trial("a"), result(1, 70, 5)) == TrialScheduler.CONTINUE
    assert json.loads(path.read_text())["records"]["1"].keys() == {"a"}
    assert s.on_trial_result(None, trial("b"), result(1, 90, 1, violation=(0.5, 0.0))) == TrialScheduler.STOP
    saved = json.loads(path.read_text())
    assert saved["stopped"]["b"]["values"] == [90.0, 1.0], "the stop is on disk before Tune acts on it"
    assert s.stopped_early("b") and not s.stopped_early("a")
    assert s.on_trial_result(None, trial("a"), {"top1": 1.0}) == TrialScheduler.CONTINUE  # no epoch: no decision
    mtime = path.stat().st_mtime_ns
    assert s.on_trial_result(None, trial("a"), result(1, 70, 5)) == TrialScheduler.CONTINUE  # replayed: no write
    assert path.stat().st_mtime_ns == mtime
    assert "1 stopped" in s.debug_string()


def test_adapter_state_survives_a_driver_kill(tmp_path):
    """Tuner.restore unpickles the scheduler as it was when the sweep STARTED; the decisions written
    through since are merged on the first event, so the resumed sweep decides as if never killed."""
    path = tmp_path / "pareto_asha.json"
    live = adapter(path)
    as_pickled_at_start = pickle.dumps(live)           # what Tune's tuner.pkl holds
    assert live.on_trial_result(None, trial("a"), result(1, 70, 5)) == TrialScheduler.CONTINUE
    assert live.on_trial_result(None, trial("b"), result(1, 60, 6)) == TrialScheduler.STOP
    assert live.on_trial_result(None, trial("c"), result(1, 80, 9)) == TrialScheduler.CONTINUE
    del live                                           # kill -9: nothing else is saved

    restored = pickle.loads(as_pickled_at_start)
    for tid in ("a", "b", "c"):
        restored.on_trial_add(None, trial(tid))        # Tune re-adds the trials of its experiment state
    assert restored.stopped_early("b")
    # b was stopped, but Tune's older snapshot had it running: it reports again, and is stopped again
    assert restored.on_trial_result(None, trial("b"), result(2, 99, 0.1)) == TrialScheduler.STOP
    # c resumed from its epoch-1 checkpoint re-reports rung 1: the decision is replayed, not retaken
    assert restored.on_trial_result(None, trial("c"), result(1, 80, 9)) == TrialScheduler.CONTINUE
    assert restored.rungs.rung_sizes() == {1: 3, 2: 0}
    # a newcomer is placed among the three that reached rung 1 before the kill: keep ceil(4/2) = 2 of a, c, d
    assert restored.on_trial_result(None, trial("d"), result(1, 65, 5.5)) == TrialScheduler.STOP
    assert restored.on_trial_result(None, trial("e"), result(1, 75, 4)) == TrialScheduler.CONTINUE


def test_adapter_without_a_state_file_starts_empty(tmp_path):
    s = ParetoASHA(rungs(), metrics=["top1", "latency_ms"], state_path=None)
    assert s.on_trial_result(None, trial("a"), result(1, 70, 5)) == TrialScheduler.CONTINUE
    with pytest.raises(ValueError, match="metrics"):
        ParetoASHA(rungs(), metrics=["top1"])
