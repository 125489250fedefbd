"""The kill matrix: the sweep's driver is SIGKILLed at a chosen point (sweeps/faults.py), then
`--resume`d; every case must end with each trial recorded exactly once in the table, the Optuna
study and MLflow, nothing left RUNNING, and the cards equal to the front.

Points: a trial told to Optuna with its MLflow run still open; told and its run ended but Tune's
state not saved since; the first card of the front written. A kill right after Tune saved a
finished trial, and a kill while a trial trains, are tests/test_sweep_e2e.py's resume fixture.
And a Ray Train worker of a two-worker trial killed a second into its second epoch: Ray Train
restarts the worker group from the first epoch's checkpoint inside the same trial, which MLflow
shows as one run.
"""
from __future__ import annotations

import pytest

from sweeps.faults import DRIVER_POINTS, ENV
from test_sweep_e2e import (SWEEP, assert_ok, cache_dir, kill_processes_using,  # noqa: F401 (fixtures)
                            pareto_table, parent_and_children, private_tmp, run_pareto, sweep_env)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("point", DRIVER_POINTS)
def test_a_sweep_killed_at_any_point_resumes_to_one_record_per_trial(point, tmp_path, private_tmp,  # noqa: F811
                                                                      cache_dir):  # noqa: F811
    import optuna

    out = tmp_path / "out"
    args = ["--smoke-test", "--out", str(out), "--trials", "3", "--concurrent", "1"]
    first = run_pareto(args, {**sweep_env(private_tmp, cache_dir), ENV: point}, tmp_path / "first.log")
    kill_processes_using(private_tmp)  # the killed driver's raylet, GCS and workers
    assert first.returncode == -9, f"the driver did not die at {point}:\n{first.stdout[-3000:]}"

    resumed = run_pareto(args + ["--resume"], sweep_env(private_tmp, cache_dir), tmp_path / "resumed.log")
    kill_processes_using(private_tmp)
    assert_ok(resumed)
    assert "resume: " in resumed.stdout  # the reconciliation said what it found

    table = pareto_table(out)
    assert len(table) == 3 and table["trial_id"].is_unique, table[["trial_id", "status"]]
    assert table["status"].isin(["ok", "stopped"]).all(), table[["trial_id", "status", "failure"]]
    parent, children = parent_and_children(out)
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["sit.trial_id"] for r in children) == sorted(table["trial_id"])
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    study = optuna.load_study(study_name=SWEEP, storage=f"sqlite:///{out}/optuna.db")
    assert not [t.number for t in study.trials if not t.state.is_finished()]
    assert sorted(t.user_attrs["tune_trial_id"] for t in study.trials) == sorted(table["trial_id"])
    front = table[table["pareto"]]
    assert {p.stem for p in (out / "cards").glob("*.yaml")} == {f"tsm-{n}" for n in front["trial_number"]}


def test_a_killed_train_worker_restarts_from_its_checkpoint_in_the_same_trial(tmp_path, private_tmp,  # noqa: F811
                                                                              cache_dir):  # noqa: F811
    out = tmp_path / "out"
    args = ["--smoke-test", "--out", str(out), "--trials", "1", "--concurrent", "1", "--workers", "2",
            "--cpus-per-worker", "0.5"]
    env = {**sweep_env(private_tmp, cache_dir), ENV: "worker-epoch", "SIT_KILL_ONCE": str(tmp_path / "killed")}
    result = run_pareto(args, env, tmp_path / "sweep.log")
    kill_processes_using(private_tmp)
    assert_ok(result)
    assert (tmp_path / "killed").exists()
    assert "starting at epoch 2" in result.stdout  # the restarted group resumed from epoch 1's checkpoint
    table = pareto_table(out)
    assert len(table) == 1 and (table["status"] == "ok").all() and (table["epoch"] == 2).all()
    _, children = parent_and_children(out)
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    from mlflow import MlflowClient
    history = MlflowClient(f"sqlite:///{out}/mlflow.db").get_metric_history(children[0].info.run_id, "val_top1")
    assert sorted(m.step for m in history) == [1, 2]
