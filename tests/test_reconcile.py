"""`--resume` reconciliation (sweeps/reconcile.py) against real stores: a Tune experiment state
written by a real (tiny) Tune run, an Optuna SQLite study and an MLflow SQLite store, arranged as
a driver killed between Tune's saves leaves them: the study and MLflow hold a trial Tune never saw.
"""
from __future__ import annotations

import optuna
import pytest
from mlflow import MlflowClient

import search_spaces
from sit_core.presets import get_preset, smoke
from sweeps import tracking
from sweeps.optuna_search import ADOPT_ATTR, TUNE_ID_ATTR, ParetoOptunaSearch, make_sampler
from sweeps.reconcile import reconcile, tune_trial_ids

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def tune_experiment(ray_local, tmp_path_factory):
    """Two finished trials in a real Tune experiment state; their ids."""
    from ray import tune

    storage = tmp_path_factory.mktemp("ray")
    grid = tune.Tuner(lambda config: {"x": config["x"]}, param_space={"x": tune.grid_search([1, 2])},
                      run_config=tune.RunConfig(name="exp", storage_path=str(storage), verbose=0)).fit()
    return str(storage / "exp"), sorted(r.metrics["trial_id"] for r in grid)


def make_searcher(study_name, url):
    job = smoke(get_preset("fmnist-cpu"))
    return ParetoOptunaSearch(search_spaces.SearchSpace.for_job(job, ("tsm",)), metric=["top1", "latency_ms"],
                              mode=["max", "min"], sampler=make_sampler("random", 0), study_name=study_name,
                              storage=url)


def test_a_trial_tune_never_saved_is_run_again_under_its_own_optuna_trial_and_run(tune_experiment, tmp_path):
    path, (a, b) = tune_experiment
    assert tune_trial_ids(path) == {a, b}
    url = f"sqlite:///{tmp_path}/optuna.db"
    searcher = make_searcher("s", url)
    for tid in (a, b, "ghost"):  # ghost: started after Tune's last save, then the driver was killed
        searcher.suggest(tid)
    for tid in (a, b):
        searcher.on_trial_complete(tid, {"top1": 50.0, "latency_ms": 3.0, "epoch": 2, "full_epochs": 2})
    ghost_params = dict(searcher.study.trials[2].params)

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.ensure_experiment(uri, "e")
    parent = tracking.start_parent_run(uri, exp, "sweep")
    client = MlflowClient(uri)
    runs = {}
    for tid in (a, b, "ghost"):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "sit.trial_id": tid})
        runs[tid] = run.info.run_id
        if tid != "ghost":
            client.set_terminated(run.info.run_id, "FINISHED")

    done = reconcile(path, "s", url, uri, exp, parent)
    assert done.tune_trials == 2 and done.adopted == (2,) and done.deleted_runs == (runs["ghost"],)
    assert "Optuna #2" in done.summary()
    left = tracking.trial_table(uri, exp, parent)
    assert sorted(left["tags.sit.trial_id"]) == sorted([a, b])  # the finished runs are untouched

    # the resumed driver's searcher (a new object, as Tune restores it) hands the orphan out first
    resumed = make_searcher("s", url)
    assert resumed.suggest("new") == ghost_params
    study = optuna.load_study(study_name="s", storage=url)
    assert study.trials[2].user_attrs[TUNE_ID_ATTR] == "new" and study.user_attrs[ADOPT_ATTR] == []
    resumed.suggest("next")  # then new points
    resumed.on_trial_complete("new", {"top1": 60.0, "latency_ms": 2.0, "epoch": 2, "full_epochs": 2})
    study = optuna.load_study(study_name="s", storage=url)
    assert [t.state for t in study.trials][:3] == [optuna.trial.TrialState.COMPLETE] * 3 and len(study.trials) == 4
    assert study.trials[2].values == [60.0, 2.0]


def test_stores_that_agree_are_left_alone(tune_experiment, tmp_path):
    path, (a, b) = tune_experiment
    url = f"sqlite:///{tmp_path}/optuna.db"
    searcher = make_searcher("s", url)
    for tid in (a, b):  # b still training when the driver died: Tune knows it and resumes it
        searcher.suggest(tid)
    searcher.on_trial_complete(a, {"top1": 50.0, "latency_ms": 3.0, "epoch": 2, "full_epochs": 2})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.ensure_experiment(uri, "e")
    parent = tracking.start_parent_run(uri, exp, "sweep")
    MlflowClient(uri).create_run(exp, tags={"mlflow.parentRunId": parent, "sit.trial_id": b})  # RUNNING
    done = reconcile(path, "s", url, uri, exp, parent)
    assert done.adopted == () and done.deleted_runs == ()
    assert "agree on 2 trial(s)" in done.summary()
    assert len(tracking.trial_table(uri, exp, parent)) == 1


def test_an_unreadable_experiment_reconciles_nothing(tmp_path):
    assert tune_trial_ids(str(tmp_path / "missing")) is None
    (tmp_path / "empty").mkdir()
    assert tune_trial_ids(str(tmp_path / "empty")) is None


def test_a_trial_that_ended_between_tunes_saves_counts_and_is_not_replaced(tmp_path):
    """Started and stopped between two of Tune's saves: the study holds it finished, Tune does not;
    the sweep's budget is counted in the study, so Tune gets no replacement to run."""
    from ray.tune.search import Searcher

    url = f"sqlite:///{tmp_path}/optuna.db"
    searcher = make_searcher("s", url)
    searcher._max_trials = 3
    for tid in ("a", "b", "ended"):
        searcher.suggest(tid)
    searcher.on_trial_complete("ended", {"top1": 20.0, "latency_ms": 3.0, "epoch": 1, "full_epochs": 2})  # PRUNED
    resumed = make_searcher("s", url)
    resumed._max_trials = 3
    assert resumed.suggest("replacement") == Searcher.FINISHED
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 3


def test_the_table_takes_an_unsaved_trials_values_from_mlflow():
    import pandas as pd

    from sweeps import results
    from sweeps.pareto_front import Constraints

    point = {"reducer": "tsm", "n_stages": 1, "pos_1": 2, "keep_1": 0.5}
    seen = {"ended": {"number": 2, "config": point, "error": None, "stopped": True, "wall_s": 3.0, "started_s": 0.0,
                      "ended_s": 3.0, "run_id": "r", "checkpoint": "/ckpt", "run_status": "KILLED",
                      "logged": {"top1": 41.0, "latency_ms": 2.5, "epoch": 1.0, "full_epochs": 2.0, "gmacs": 0.01}}}
    table = results.build(pd.DataFrame(), seen, objectives={"top1": "max", "latency_ms": "min"},
                          constraints=Constraints())
    row = table.iloc[0]
    assert (row["top1"], row["latency_ms"], row["epoch"], row["status"]) == (41.0, 2.5, 1.0, "stopped")
    assert not row["full_budget"] and not row["pareto"] and "logged" not in table


def test_an_orphan_killed_between_ask_and_its_last_suggestion_gets_a_whole_point(tune_experiment, tmp_path):
    path, (a, b) = tune_experiment
    url = f"sqlite:///{tmp_path}/optuna.db"
    searcher = make_searcher("s", url)
    for tid in (a, b):
        searcher.suggest(tid)
        searcher.on_trial_complete(tid, {"top1": 50.0, "latency_ms": 3.0, "epoch": 2, "full_epochs": 2})
    cut = searcher.study.ask()  # the driver died right after `ask`: no params yet
    cut.set_user_attr(TUNE_ID_ATTR, "cut")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.ensure_experiment(uri, "e")
    parent = tracking.start_parent_run(uri, exp, "sweep")
    assert reconcile(path, "s", url, uri, exp, parent).adopted == (2,)
    point = make_searcher("s", url).suggest("new")
    n = point["n_stages"]  # a whole point of the space: every stage's position and keep ratio
    assert {"reducer", "lr", "tau", *(f"pos_{i}" for i in range(1, n + 1)), *(f"keep_{i}" for i in range(1, n + 1))} <= set(point)
    assert point == optuna.load_study(study_name="s", storage=url).trials[2].params
