"""The driver's Tune callback against a real SQLite MLflow store, driven as Tune drives it (trials are
stand-ins with Tune's attributes; no Ray instance): numbering, live timestamps, end times, packaging."""
import contextlib

import cloudpickle
import pytest
from mlflow import MlflowClient

from sweeps import tracking
from sweeps.results import label
from sweeps.trial_logger import PACKAGE_ERROR_TAG, TrialRunLogger

T0 = 1_700_000_000.0  # the trials report at these times (seconds), whatever the clock says when the driver logs


class Checkpoint:
    filesystem = None  # a local one, as Ray's checkpoints on local storage

    def __init__(self, path):
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class Trial:
    def __init__(self, trial_id, index, keep, tmp_path):
        self.trial_id, self.experiment_tag = trial_id, f"{index}_keep_1={keep}"
        self.config = {"reducer": "tsm", "n_stages": 1, "pos_1": 2, "keep_1": keep}
        self.last_result, self.error_file = {}, None
        self.checkpoint = Checkpoint(tmp_path / trial_id)


def report(logger, trial, epoch, at):
    result = {"epoch": epoch, "top1": 10.0 * epoch, "latency_ms": 3.0, "reported_at": at, "timestamp": int(at)}
    trial.last_result = result
    logger.on_trial_result(0, [], trial, result)


@pytest.fixture
def store(tmp_path):
    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "logger")
    parent = tracking.start_parent_run(uri, exp, "s", {}, {})
    return uri, exp, parent


def test_trials_are_numbered_in_creation_order_and_logged_live(store, tmp_path):
    uri, exp, parent = store
    def package(run_id, config, number, last, checkpoint_dir):
        if number == 1:
            raise RuntimeError("disk full")
        return {"sit.model_uri": f"models:/m-{number}", "seen": f"{config['keep_1']} {last['epoch']} {checkpoint_dir}"}

    logger = TrialRunLogger(uri, exp, parent, name_of=label, on_finished=package)
    logger = cloudpickle.loads(cloudpickle.dumps(logger))  # Tune pickles its callbacks with the Tuner
    b, a, c = Trial("b", 2, 0.5, tmp_path), Trial("a", 1, 0.7, tmp_path), Trial("c", 3, 0.6, tmp_path)
    for t in (b, a, c):  # b's process happened to start first: numbers still follow Tune's creation order
        logger.on_trial_start(0, [], t)
    for epoch in (1, 2):
        for k, t in enumerate((a, b, c)):
            report(logger, t, epoch, T0 + 60 * epoch + k)
    report(logger, a, 2, T0 + 500)  # a replayed report: not logged twice
    logger.on_trial_complete(0, [], a)
    logger.on_trial_complete(0, [], b)
    logger.on_experiment_end([])  # c never finished: the sweep was interrupted
    client = MlflowClient(uri)
    runs = {r.data.tags["sit.trial_id"]: r for r in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert {t: r.info.run_name for t, r in runs.items()} == {"a": "tsm 2@0.7 #0", "b": "tsm 2@0.5 #1", "c": "tsm 2@0.6 #2"}
    assert {t: r.info.status for t, r in runs.items()} == {"a": "FINISHED", "b": "FINISHED", "c": "KILLED"}
    history = sorted((m.step, m.timestamp) for m in client.get_metric_history(runs["a"].info.run_id, "top1"))
    assert history == [(1, int((T0 + 60) * 1000)), (2, int((T0 + 120) * 1000))]
    assert "reported_at" not in runs["a"].data.metrics
    assert runs["a"].info.end_time == int((T0 + 500) * 1000)  # its last report, not when packaging ended
    assert runs["a"].data.tags["sit.model_uri"] == "models:/m-0"
    assert runs["a"].data.tags["seen"] == f"0.7 2 {tmp_path / 'a'}"  # the point, its last result, its checkpoint
    assert runs["b"].data.tags[PACKAGE_ERROR_TAG] == "RuntimeError: disk full"
    assert runs["c"].data.tags["sit.interrupted"] == "true"


def test_a_resumed_sweep_keeps_numbers_and_gives_new_trials_free_ones(store, tmp_path):
    uri, exp, parent = store
    first = TrialRunLogger(uri, exp, parent, name_of=label)
    first.on_trial_start(0, [], Trial("a", 1, 0.7, tmp_path))
    # after a restart Tune's counter may begin again: a taken count gives the next free number
    again = TrialRunLogger(uri, exp, parent, name_of=label)
    again.on_trial_start(0, [], Trial("a", 1, 0.7, tmp_path))
    again.on_trial_start(0, [], Trial("d", 1, 0.4, tmp_path))
    names = sorted(r.info.run_name for r in MlflowClient(uri).search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'"))
    assert names == ["tsm 2@0.4 #1", "tsm 2@0.7 #0"]
