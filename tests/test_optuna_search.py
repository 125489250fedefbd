"""ParetoOptunaSearch without a Ray cluster: Tune's searcher protocol (`suggest` / `on_trial_complete`
/ `save` / `restore`) driven by hand over a define-by-run space and a SQLite RDBStorage, as
`sweeps.sweep` sets it up.

What must hold: failed trials (error, or objectives missing / non-finite) are FAIL in the study
(Ray's own OptunaSearch tells them COMPLETE or leaves them RUNNING); trials stopped before their
full budget are PRUNED with their last values; constraint violations reach Optuna, so
`study.best_trials` never holds an infeasible trial; Optuna's front equals
`sweeps.pareto_front.pareto_mask` over the same table (the sweep prints that they agree); and a
driver restored from an older checkpoint never raises on a trial the study already finished.
"""
from __future__ import annotations

import math
import pickle

import numpy as np
import optuna
import pandas as pd
import pytest

import search_spaces
from sit_core.presets import get_preset, smoke
from sweeps import pareto_front
from sweeps.optuna_search import CONSTRAINTS, TUNE_ID_ATTR, ParetoOptunaSearch, make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

OBJECTIVES = {"top1": "max", "latency_ms": "min"}
TS = optuna.trial.TrialState


@pytest.fixture
def job():
    return smoke(get_preset("fmnist-cpu"))


def make_searcher(job, url, *, sampler="tpe", study_name="s", warm=False, reducers=("tsm",)):
    space = search_spaces.SearchSpace.for_job(job, reducers)
    return ParetoOptunaSearch(
        space=space,
        metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()),
        points_to_evaluate=search_spaces.warm_starts(job, space) if warm else None,
        sampler=make_sampler(sampler, 0), study_name=study_name,
        storage=optuna.storages.RDBStorage(url),
    )


def ok(top1, latency, violation=(0.0, 0.0), **extra):
    """A final trial result as `sweeps.trial.run_trial` reports it (full budget unless `epoch` says)."""
    return {"top1": top1, "latency_ms": latency, "constraint_violation": list(violation),
            "feasible": all(v <= 0 for v in violation), "status": "ok", "epoch": 4, "full_epochs": 4, **extra}


# trial id -> (result, error). Infeasible rows are chosen to dominate feasible ones, so a searcher
# that ignored constraints would put them on the front.
RESULTS = {
    "t00": (ok(70.0, 10.0), False),
    "t01": (ok(80.0, 20.0), False),
    "t02": (ok(75.0, 12.0), False),
    "t03": (ok(65.0, 15.0), False),                             # dominated by t00
    "t04": (ok(99.0, 1.0, violation=(0.5, 0.0)), False),        # over the latency budget
    "t05": (ok(98.0, 2.0, violation=(0.0, 3.0)), False),        # under the accuracy floor
    "t06": (ok(85.0, 30.0, violation=(-1.0, -2.0)), False),     # negative violation = satisfied
    "t07": ({"top1": 90.0, "epoch": 1, "status": "ok"}, False),  # last epoch report: no latency
    "t08": (ok(95.0, 0.5), True),                               # the trial errored
    "t09": (None, True),                                        # errored before any report
    "t10": (ok(float("nan"), 5.0), False),                      # diverged
    "t11": (ok(80.0, 20.0), False),                             # tie with t01: both on the front
    "t12": (ok(60.0, 9.0), False),
    "t13": (ok(90.0, float("inf")), False),                     # broken benchmark
}
FAILED = {"t07", "t08", "t09", "t10", "t13"}
INFEASIBLE = {"t04", "t05"}


@pytest.fixture
def completed(job, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(job, url)
    configs = {}
    for trial_id in RESULTS:
        configs[trial_id] = searcher.suggest(trial_id)
    for trial_id, (result, error) in RESULTS.items():
        searcher.on_trial_complete(trial_id, result, error=error)
    study = optuna.load_study(study_name="s", storage=url)
    return searcher, study, configs, url


def by_tune_id(study) -> dict:
    return {t.user_attrs[TUNE_ID_ATTR]: t for t in study.get_trials(deepcopy=False)}


def result_table() -> pd.DataFrame:
    rows = []
    for trial_id, (result, error) in RESULTS.items():
        r = result or {}
        rows.append({"trial_id": trial_id, "top1": r.get("top1"), "latency_ms": r.get("latency_ms"),
                     "feasible": bool(r.get("feasible", False)) and not error})
    table = pd.DataFrame(rows)
    for c in OBJECTIVES:
        table[c] = pd.to_numeric(table[c], errors="coerce")
    return table


def test_sampled_configs_are_valid_jobs(job, completed):
    _, _, configs, _ = completed
    for config in configs.values():
        built = search_spaces.apply_point(job, config)
        assert built.model.schedule.positions == tuple(config[f"pos_{i + 1}"] for i in range(config["n_stages"]))


def test_states_and_user_attrs(completed):
    searcher, study, _, _ = completed
    trials = by_tune_id(study)
    assert set(trials) == set(RESULTS), "every Tune trial is one Optuna trial, tagged with its Tune id"
    for trial_id, t in trials.items():
        expected = TS.FAIL if trial_id in FAILED else TS.COMPLETE
        assert t.state == expected, (trial_id, t.state)
        if expected == TS.FAIL:
            assert t.values is None
            assert t.constraints == {} or all(v <= 0 for v in t.constraints.values())
        else:
            result = RESULTS[trial_id][0]
            assert t.values == [result["top1"], result["latency_ms"]]
            assert set(t.constraints) == set(CONSTRAINTS)
            assert [t.constraints[k] for k in CONSTRAINTS] == result["constraint_violation"]
    assert not [t for t in study.trials if t.state == TS.RUNNING], "no trial may be left RUNNING"
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]


def test_best_trials_are_feasible_and_match_pareto_mask(completed):
    _, study, _, _ = completed
    best = {t.user_attrs[TUNE_ID_ATTR] for t in study.best_trials}
    assert best, "some feasible trial must be on the front"
    assert not best & INFEASIBLE, f"infeasible trials on Optuna's front: {best & INFEASIBLE}"
    assert not best & FAILED
    for t in study.best_trials:
        assert all(v <= 0 for v in t.constraints.values())

    table = result_table()
    mask = pareto_front.pareto_mask(table, OBJECTIVES)
    ours = set(table.loc[mask, "trial_id"])
    assert ours == best
    assert ours == {"t00", "t01", "t02", "t06", "t11", "t12"}  # ties t01/t11 both kept


def test_front_by_brute_force(completed):
    """Every front member is feasible, finite and undominated; every other usable trial is dominated."""
    _, study, _, _ = completed
    usable = {tid: t for tid, t in by_tune_id(study).items()
              if t.state == TS.COMPLETE and all(v <= 0 for v in t.constraints.values())}
    assert set(usable) == set(RESULTS) - FAILED - INFEASIBLE

    def dominates(a, b):  # a, b: (top1, latency); max top1, min latency
        no_worse = a[0] >= b[0] and a[1] <= b[1]
        return no_worse and (a[0] > b[0] or a[1] < b[1])

    best = {t.user_attrs[TUNE_ID_ATTR] for t in study.best_trials}
    for tid, t in usable.items():
        dominated = any(dominates(o.values, t.values) for oid, o in usable.items() if oid != tid)
        assert (tid in best) == (not dominated), tid
    for tid in best:
        assert all(math.isfinite(v) for v in usable[tid].values)


def test_random_tables_agree_with_optuna(job, tmp_path):
    """Many random tables (ties, infeasible rows, failures): Optuna's front == pareto_mask == brute force."""
    rng = np.random.default_rng(0)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    for rep in range(4):
        searcher = make_searcher(job, url, sampler="random", study_name=f"r{rep}")
        rows = []
        for i in range(25):
            tid = f"r{rep}_{i}"
            searcher.suggest(tid)
            top1 = float(rng.integers(50, 60))           # coarse values: many ties and duplicates
            lat = float(rng.integers(1, 8))
            kind = rng.choice(["ok", "ok", "ok", "infeasible", "error", "missing"])
            violation = [float(rng.uniform(0.1, 2))] if kind == "infeasible" else [float(-rng.uniform(0, 1))]
            violation += [0.0]
            if kind == "error":
                searcher.on_trial_complete(tid, ok(top1, lat), error=True)
            elif kind == "missing":
                searcher.on_trial_complete(tid, {"top1": top1})
            else:
                searcher.on_trial_complete(tid, ok(top1, lat, violation))
            rows.append({"trial_id": tid, "top1": top1 if kind != "error" else np.nan,
                         "latency_ms": lat if kind in ("ok", "infeasible") else np.nan,
                         "feasible": kind == "ok"})
        table = pd.DataFrame(rows)
        study = optuna.load_study(study_name=f"r{rep}", storage=url)
        best = {t.user_attrs[TUNE_ID_ATTR] for t in study.best_trials}
        ours = set(table.loc[pareto_front.pareto_mask(table, OBJECTIVES), "trial_id"])
        assert best == ours
        feasible = table[table["feasible"]]
        brute = set()
        for _, a in feasible.iterrows():
            if not any((b.top1 >= a.top1 and b.latency_ms <= a.latency_ms
                        and (b.top1 > a.top1 or b.latency_ms < a.latency_ms)) for _, b in feasible.iterrows()):
                brute.add(a.trial_id)
        assert ours == brute
        states = {t.user_attrs[TUNE_ID_ATTR]: t.state for t in study.trials}
        for row in rows:
            failed = np.isnan(row["latency_ms"])
            assert states[row["trial_id"]] == (TS.FAIL if failed else TS.COMPLETE)


def test_repeated_completion_is_ignored(completed):
    searcher, study, _, url = completed
    before = [(t.number, t.state, t.values) for t in study.trials]
    searcher.on_trial_complete("t00", ok(1.0, 99.0))           # Tune may report a trial twice
    searcher.on_trial_complete("t08", None, error=True)
    after = [(t.number, t.state, t.values) for t in optuna.load_study(study_name="s", storage=url).trials]
    assert after == before


def test_warm_starts_come_first_and_exactly(job, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    warm = search_spaces.warm_starts(job, search_spaces.SearchSpace.for_job(job))
    searcher = make_searcher(job, url, warm=True)
    suggested = [searcher.suggest(f"w{i}") for i in range(len(warm) + 1)]
    for point, got in zip(warm, suggested):
        assert got == pytest.approx(point)
    search_spaces.apply_point(job, suggested[-1])  # the first sampled point after them is valid too


def test_searcher_checkpoint_round_trip(job, tmp_path):
    """Tune checkpoints the searcher with pickle (`save`/`restore`); the restored one goes on."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(job, url)
    for tid in ("a", "b", "c"):
        searcher.suggest(tid)
    searcher.on_trial_complete("a", ok(70.0, 5.0))
    searcher.on_trial_complete("b", ok(60.0, 1.0, violation=(1.0, 0.0)))
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    pickle.loads(path.read_bytes())  # plain pickle, as Tune's experiment state does

    restored = make_searcher(job, url)
    restored.restore(str(path))
    restored.on_trial_complete("c", {"top1": 1.0}, error=True)  # in flight at the checkpoint
    for tid in ("d", "e"):
        search_spaces.apply_point(job, restored.suggest(tid))
    restored.on_trial_complete("d", ok(80.0, 6.0))
    restored.on_trial_complete("e", None, error=True)
    study = optuna.load_study(study_name="s", storage=url)
    states = {t.user_attrs.get(TUNE_ID_ATTR): t.state for t in study.trials}
    assert states == {"a": TS.COMPLETE, "b": TS.COMPLETE, "c": TS.FAIL, "d": TS.COMPLETE, "e": TS.FAIL}
    assert {t.user_attrs[TUNE_ID_ATTR] for t in study.best_trials} == {"a", "d"}


@pytest.mark.parametrize("name, cls, rounds", [("tpe", optuna.samplers.TPESampler, 14),
                                               ("nsga2", optuna.samplers.NSGAIISampler, 14),
                                               ("random", optuna.samplers.RandomSampler, 14),
                                               ("gp", optuna.samplers.GPSampler, 7)])
def test_make_sampler(name, cls, rounds, job, tmp_path):
    assert isinstance(make_sampler(name, 0), cls)
    # every sampler drives the define-by-run space through a few completed rounds, with constraints
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(job, url, sampler=name, reducers=("tsm", "drop", "merge"))
    rng = np.random.default_rng(1)
    for i in range(rounds):
        config = searcher.suggest(f"{name}{i}")
        assert config["reducer"] in ("tsm", "drop", "merge")
        search_spaces.apply_point(job, config)
        searcher.on_trial_complete(f"{name}{i}", ok(float(rng.uniform(50, 90)), float(rng.uniform(1, 9)),
                                                    (float(rng.uniform(-1, 1)), 0.0)))
    study = optuna.load_study(study_name="s", storage=url)
    assert all(t.state == TS.COMPLETE for t in study.trials)
    assert all(all(v <= 0 for v in t.constraints.values()) for t in study.best_trials)


def test_make_sampler_rejects_unknown():
    with pytest.raises(ValueError, match="not one of"):
        make_sampler("cmaes", 0)


def test_trials_stopped_early_are_pruned_with_their_last_values(job, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(job, url)
    for tid in ("full", "stopped", "stopped-infeasible"):
        searcher.suggest(tid)
    searcher.on_trial_complete("full", ok(70.0, 5.0))
    searcher.on_trial_complete("stopped", ok(90.0, 1.0, epoch=1))         # stopped at the first rung
    searcher.on_trial_complete("stopped-infeasible", ok(95.0, 0.5, violation=(2.0, 0.0), epoch=2))
    study = optuna.load_study(study_name="s", storage=url)
    trials = by_tune_id(study)
    assert trials["full"].state == TS.COMPLETE
    for tid, values, epoch in (("stopped", [90.0, 1.0], 1), ("stopped-infeasible", [95.0, 0.5], 2)):
        t = trials[tid]
        assert t.state == TS.PRUNED and t.values is None
        assert t.user_attrs["last_values"] == values and t.user_attrs["last_epoch"] == epoch
    assert trials["stopped-infeasible"].constraints["latency_budget"] == 2.0  # samplers rank it infeasible
    # the stopped trials dominate the full one, but only full-budget trials can be on the front
    assert [t.user_attrs[TUNE_ID_ATTR] for t in study.best_trials] == ["full"]


def test_a_restored_driver_never_retells_a_finished_trial(job, tmp_path):
    """The kill of issue 11: Tune's saved state (and the searcher's checkpoint) is older than the
    study. The restored searcher finds its trials by their Tune ids in the study, ignores the ones
    the study already finished, finishes the others, and asks on; warm starts are not enqueued twice."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(job, url, warm=True)
    n_warm = len(search_spaces.warm_starts(job, search_spaces.SearchSpace.for_job(job)))
    at_start = pickle.dumps(searcher)                       # Tune's tuner.pkl: the searcher before any trial
    searcher.suggest("a")
    checkpoint = tmp_path / "searcher-state.pkl"
    searcher.save(str(checkpoint))                          # Tune's last experiment checkpoint: only "a" exists
    searcher.suggest("b")
    searcher.on_trial_complete("a", ok(70.0, 5.0))
    searcher.on_trial_complete("b", ok(72.0, 6.0, epoch=1))  # b stopped early: PRUNED
    del searcher                                            # kill -9

    restored = pickle.loads(at_start)
    restored.restore(str(checkpoint))
    restored.on_trial_complete("a", ok(1.0, 99.0))          # re-run after the restore: the study keeps its value
    restored.on_trial_complete("b", ok(80.0, 4.0))          # already PRUNED: left alone
    assert restored.suggest("a") == restored.suggest("a")   # asked again: the same point, no new trial
    restored.suggest("c")
    restored.on_trial_complete("c", ok(75.0, 5.5))
    study = optuna.load_study(study_name="s", storage=url)
    trials = by_tune_id(study)
    assert n_warm <= 3 and len(study.trials) == 3 and set(trials) == {"a", "b", "c"}  # no warm start enqueued twice
    assert trials["a"].values == [70.0, 5.0] and trials["b"].state == TS.PRUNED
    assert trials["c"].state == TS.COMPLETE


def test_a_trial_the_scheduler_stopped_is_pruned_even_at_full_budget(job, tmp_path):
    """A stop is final: a resumed sweep may run a stopped trial to its end (Tune's older state had it
    running); the scheduler still says stopped, so Optuna records PRUNED like MLflow's KILLED."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = search_spaces.SearchSpace.for_job(job)
    stopped = {"s"}
    searcher = ParetoOptunaSearch(space, metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()),
                                  sampler=make_sampler("random", 0), study_name="s", storage=url,
                                  stopped_early=stopped.__contains__)
    for tid in ("s", "t"):
        searcher.suggest(tid)
        searcher.on_trial_complete(tid, ok(80.0, 2.0))  # both at full budget
    trials = by_tune_id(optuna.load_study(study_name="s", storage=url))
    assert trials["s"].state == TS.PRUNED and trials["s"].user_attrs["last_values"] == [80.0, 2.0]
    assert trials["t"].state == TS.COMPLETE
