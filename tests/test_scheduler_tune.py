"""MO-ASHA inside a real Ray Tune run, wired as `sweeps.sweep` wires it (searcher, scheduler, MLflow
logger, trial table), with a deterministic stand-in for training so that which trials are stopped
is known: every trial stopped by the scheduler is PRUNED in Optuna (with the values it was stopped
at), KILLED in MLflow, `stopped` in the table and never on the front; the scheduler's state is on
disk; the others are COMPLETE, FINISHED, ok."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import optuna
import pytest
import ray.cloudpickle
from ray import tune

from sweeps import pareto, results, sweep, tracking
from sweeps.trial_logger import TrialRunLogger

pytestmark = pytest.mark.slow
EPOCHS = 3  # rungs after epochs 1 and 2 (grace 1, eta 2)


def fake_training(config: dict) -> None:
    """Reports like `sweeps.trial.run_trial`: accuracy set by the lr (best at 1e-3) and growing with
    the epochs, latency set by the first keep ratio. Deterministic."""
    import math as m
    from ray import tune as t

    final = 90.0 - 40.0 * abs(m.log10(config["lr"]) - m.log10(1e-3))
    latency = 10.0 * config["keep_1"]
    for epoch in range(1, EPOCHS + 1):
        t.report({"epoch": epoch, "full_epochs": EPOCHS, "top1": final * epoch / EPOCHS, "latency_ms": latency,
                  "val_top1": final * epoch / EPOCHS, "feasible": True, "status": "ok", "work_s": 0.0})


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune_moasha")
    plan = pareto.make_plan(pareto.build_parser().parse_args(
        ["--out", str(out), "--trials", "8", "--concurrent", "1", "--sampler", "random",
         "--epochs", str(EPOCHS), "--no-warm-start", "--eta", "2"]))
    exp_id = tracking.ensure_experiment(plan.tracking_uri, sweep.EXPERIMENT)
    parent = tracking.start_parent_run(plan.tracking_uri, exp_id, plan.name)
    scheduler = sweep.make_scheduler(plan)
    logger = TrialRunLogger(plan.tracking_uri, exp_id, parent, name_of=results.label,
                            stopped_early=scheduler.stopped_early)
    grid = sweep._tuner(plan, tune.with_resources(fake_training, {"CPU": 1}), 1,
                        searcher=sweep.make_searcher(plan, scheduler), scheduler=scheduler, logger=logger).fit()
    trials = sweep._trials(grid, tracking.trial_table(plan.tracking_uri, exp_id, parent), plan.storage)
    table = results.build(grid.get_dataframe(), trials, objectives=plan.objectives, constraints=plan.constraints)
    return plan, scheduler, table, exp_id, parent


def test_stopped_trials_are_pruned_killed_and_off_the_front(swept):
    plan, scheduler, table, exp_id, parent = swept
    assert len(table) == 8 and scheduler.rungs.rungs == [1, 2]
    stopped = set(table.loc[table["status"] == "stopped", "trial_id"])
    assert stopped, "8 random learning rates: some trial must fall behind at a rung"
    assert stopped == set(scheduler.rungs.stopped)
    assert (table.loc[table["status"] == "stopped", "epoch"] < EPOCHS).all()
    assert (table.loc[table["status"] == "ok", "epoch"] == EPOCHS).all()
    assert not table.loc[table["status"] == "stopped", "pareto"].any()
    assert table["pareto"].any()

    study = optuna.load_study(study_name=plan.name, storage=plan.optuna_storage)
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert set(by_id) == set(table["trial_id"])
    for trial_id, t in by_id.items():
        if trial_id in stopped:
            where = scheduler.rungs.stopped[trial_id]
            assert t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["last_epoch"] == where["step"]
            assert t.user_attrs["last_values"] == pytest.approx(where["values"])
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE
    assert {t.user_attrs["tune_trial_id"] for t in study.best_trials} == set(table.loc[table["pareto"], "trial_id"])

    runs = tracking.trial_table(plan.tracking_uri, exp_id, parent)
    status = dict(zip(runs["tags.sit.trial_id"], runs["status"]))
    assert {tid for tid, s in status.items() if s == "KILLED"} == stopped
    assert {tid for tid, s in status.items() if s == "FINISHED"} == set(table["trial_id"]) - stopped
    assert all(runs.loc[runs["status"] == "KILLED", "tags.sit.stopped_early"] == "true")


def test_the_scheduler_state_is_on_disk(swept):
    plan, scheduler, table, *_ = swept
    saved = json.loads(Path(plan.local_dir, sweep.SCHEDULER_STATE).read_text())
    assert set(saved["stopped"]) == set(scheduler.rungs.stopped)
    assert {int(r): len(rec) for r, rec in saved["records"].items()} == scheduler.rungs.rung_sizes()
    # every trial reached rung 1; what rung 1 stopped never reached rung 2
    assert set(saved["records"]["1"]) == set(table["trial_id"])
    assert not set(saved["records"]["2"]) & {t for t, w in saved["stopped"].items() if w["step"] == 1}
    # each decision follows the rule on the values recorded (top-1 up, latency down), replayed in arrival order
    from sweeps.moasha import ParetoRungs
    replay = ParetoRungs([1, 2], 2.0, ["max", "min"])
    for rung in ("1", "2"):
        for trial_id, row in saved["records"][rung].items():
            assert replay.on_result(trial_id, int(rung), row[:2], row[2]) == row[3]
    assert math.isfinite(table["top1"].max())
