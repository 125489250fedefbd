"""The kill matrix: the sweep's driver is SIGKILLed at a chosen point (sweeps/faults.py), then
`--resume`d; every case must end with each trial recorded exactly once in the table, the Optuna
study and MLflow, nothing left RUNNING, and the cards equal to the front.

Points: a trial told to Optuna with its MLflow run still open; told and its run ended but Tune's
state not saved since; the front measured end to end, none of it written; the first card of the
front written; the teacher training (its first epoch saved). A kill right after Tune saved a
finished trial, and a kill while a trial trains, are tests/test_sweep_e2e.py's resume fixture.
A full --out mid-run stops the sweep like a kill, with a clear message (sweeps/out_guard.py).
And a Ray Train worker of a two-worker trial killed a second into its second epoch: Ray Train
restarts the worker group from the first epoch's checkpoint inside the same trial, which MLflow
shows as one run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps.faults import DRIVER_POINTS, ENV, HOLD_ENV
from sweeps.out_guard import EXIT_CODE, HEADROOM_ENV
from test_sweep_e2e import (PARETO, ROOT, SWEEP, assert_ok, cache_dir,  # noqa: F401 (fixtures)
                            kill_processes_using, pareto_table, parent_and_children, private_tmp,
                            run_pareto, sweep_env)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("point", [p for p in DRIVER_POINTS if p != "teacher-epoch"])
def test_a_sweep_killed_at_any_point_resumes_to_one_record_per_trial(point, tmp_path, private_tmp,  # noqa: F811
                                                                      cache_dir):  # noqa: F811
    out = tmp_path / "out"
    args = ["--smoke-test", "--out", str(out), "--trials", "3", "--concurrent", "1"]
    first = run_pareto(args, {**sweep_env(private_tmp, cache_dir), ENV: point}, tmp_path / "first.log")
    kill_processes_using(private_tmp)  # the killed driver's raylet, GCS and workers
    assert first.returncode == -9, f"the driver did not die at {point}:\n{first.stdout[-3000:]}"

    resumed = run_pareto(args + ["--resume"], sweep_env(private_tmp, cache_dir), tmp_path / "resumed.log")
    kill_processes_using(private_tmp)
    assert_ok(resumed)
    assert "resume: " in resumed.stdout  # the reconciliation said what it found
    assert_one_record_per_trial(out, 3)


def test_a_sweep_killed_while_its_teacher_trains_resumes_the_teacher(tmp_path, private_tmp):  # noqa: F811
    """Its own teacher cache (the module's holds the smoke teacher): the teacher trains 2 epochs, the
    driver dies once the first is checkpointed; `--resume` finds no sweep saved yet, starts it, and the
    teacher goes on from epoch 2 into one cached file."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--smoke-test", "--out", str(out), "--trials", "2", "--concurrent", "1",
            "--set", "teacher_train.epochs=2"]
    first = run_pareto(args, {**sweep_env(private_tmp, str(cache)), ENV: "teacher-epoch"}, tmp_path / "first.log")
    kill_processes_using(private_tmp)
    assert first.returncode == -9, f"the driver did not die while the teacher trained:\n{first.stdout[-3000:]}"
    assert not list(cache.glob("teachers/*.pt")), "a teacher was cached before it finished"

    resumed = run_pareto(args + ["--resume"], sweep_env(private_tmp, str(cache)), tmp_path / "resumed.log")
    kill_processes_using(private_tmp)
    assert_ok(resumed)
    assert "saved nothing" in resumed.stdout
    teachers = list(cache.glob("teachers/*.pt"))
    assert len(teachers) == 1
    # its own last report: epoch 2 of a run that started from epoch 1's checkpoint (the worker's printed
    # "starting at epoch 2" reaches the driver only if Ray's log monitor forwards it in time)
    metrics = json.loads(teachers[0].with_suffix(".json").read_text())["metrics"]
    assert metrics["epoch"] == 2 and metrics["resumed_from_epoch"] == 1, metrics
    assert "teacher: went on from its epoch-1 checkpoint" in resumed.stdout  # the driver says so itself
    assert_one_record_per_trial(out, 2)


def test_a_full_out_stops_the_sweep_with_a_clear_error_and_it_resumes_once_there_is_room(  # noqa: F811
        tmp_path, private_tmp, cache_dir):  # noqa: F811
    """A real full disk, scaled down: the sweep keeps `free now - 1 GiB` free (SIT_OUT_HEADROOM_MB).
    The driver is held right after its first trial is logged (SIT_HOLD_AT), a 2 GiB file takes the
    room (fallocate), then it goes on: it stops (exit 75) saying why, with no traceback. The file
    removed, `--resume` finishes with one record per trial."""
    out = tmp_path / "out"
    args = ["--smoke-test", "--out", str(out), "--trials", "3", "--concurrent", "1"]
    headroom_mb = shutil.disk_usage(tmp_path).free // 2**20 - 1024
    hold = tmp_path / "hold"
    hold.touch()
    env = {**sweep_env(private_tmp, cache_dir), HEADROOM_ENV: str(headroom_mb), HOLD_ENV: f"trial-logged:{hold}"}
    filler = tmp_path / "filler"
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, PARETO, *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 600
            while not Path(f"{hold}.reached").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert proc.poll() is None, f"the sweep ended before its first trial was logged:\n{log.read_text()[-3000:]}"
            with open(filler, "wb") as g:
                os.posix_fallocate(g.fileno(), 0, 2 * 2**30)
            time.sleep(2.5)  # past the guard's 2 s between checks
            hold.unlink()
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    kill_processes_using(private_tmp)
    text = log.read_text()
    assert rc == EXIT_CODE, f"exit {rc}:\n{text[-3000:]}"
    assert "MiB free" in text and "--resume" in text and "Traceback" not in text.split("stopping the sweep")[-1]

    filler.unlink()
    resumed = run_pareto(args + ["--resume"], sweep_env(private_tmp, cache_dir) | {HEADROOM_ENV: str(headroom_mb)},
                         tmp_path / "resumed.log")
    kill_processes_using(private_tmp)
    assert_ok(resumed)
    assert_one_record_per_trial(out, 3)


def assert_one_record_per_trial(out, n: int) -> None:
    import optuna

    table = pareto_table(out)
    assert len(table) == n and table["trial_id"].is_unique, table[["trial_id", "status"]]
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
    # The worker dies 1 s after its epoch-1 report. Epochs of 64 small steps (~3 s) put that mid-way
    # through epoch 2 (the smoke's 4 steps took 0.6 s on CI: the kill came after the last report).
    # Ray Train's controller collects reports, checkpoints included, when it polls the workers (every
    # 2 s by default): a worker lost before the poll takes its report with it and the group restarts
    # from the previous checkpoint. Polling every 0.2 s makes the epoch-1 checkpoint count before the kill.
    args = ["--smoke-test", "--out", str(out), "--trials", "1", "--concurrent", "1", "--workers", "2",
            "--cpus-per-worker", "0.5", "--set", "train.batch_size=8", "--set", "train.max_steps_per_epoch=64"]
    env = {**sweep_env(private_tmp, cache_dir), ENV: "worker-epoch", "SIT_KILL_ONCE": str(tmp_path / "killed"),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    result = run_pareto(args, env, tmp_path / "sweep.log")
    kill_processes_using(private_tmp)
    assert_ok(result)
    assert (tmp_path / "killed").exists()
    table = pareto_table(out)
    assert len(table) == 1 and (table["status"] == "ok").all() and (table["epoch"] == 2).all()
    # the restarted group resumed from epoch 1's checkpoint: its own report says so
    assert (table["resumed_from_epoch"] == 1).all(), table.filter(like="epoch")
    _, children = parent_and_children(out)
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    from mlflow import MlflowClient
    history = MlflowClient(f"sqlite:///{out}/mlflow.db").get_metric_history(children[0].info.run_id, "val_top1")
    assert sorted(m.step for m in history) == [1, 2]
