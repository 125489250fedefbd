"""sweeps.tracking against a real SQLite MLflow store: one sweep, three trials, read back."""

import json

import pandas as pd
import pytest
from mlflow import MlflowClient

from sweeps import tracking

EPOCHS = 3
SPEED = {"p50_ms": 12.5, "img_s": 410.0, "device": "cpu", "dtype": "float32", "batch_size": 8,
         "img_size": (32, 32), "channels_last": False}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One store, one sweep: trials a, b (finished), c (failed). Shared: MLflow setup costs seconds."""
    out = tmp_path_factory.mktemp("sweep")
    uri = tracking.default_tracking_uri(out)
    exp = tracking.ensure_experiment(uri, "sit-test")
    parent = tracking.start_parent_run(uri, exp, "sweep-1", {"budget": {"trials": 3}}, {"k": "v"})
    children = {}
    for i, tid in enumerate(["a", "b", "c"]):
        failed = tid == "c"
        epochs = [{"epoch": e, "top1": 0.1 * (e + i), "loss": 1.0 / (e + 1), "host": "n1"}
                  for e in range(1 if failed else EPOCHS)]
        children[tid] = tracking.log_trial(
            uri, exp, parent, tid,
            params={"model": {"schedule": {"keep": 0.5 + 0.1 * i}, "name": "vit"}, "lr": 1e-3},
            epoch_metrics=epochs,
            final_metrics={} if failed else {"top1": 0.5 + 0.1 * i, "latency_ms": 10.0 - i},
            speed_record=None if failed else SPEED,
            status="FAILED" if failed else "FINISHED",
            failure="RuntimeError: out of memory" if failed else None,
            tags={"sit.sweep_id": "sweep-1"})
    return {"uri": uri, "exp": exp, "parent": parent, "children": children, "out": out,
            "client": MlflowClient(uri)}


def test_uri_is_absolute_sqlite_under_out_dir(sweep):
    assert sweep["uri"] == f"sqlite:///{sweep['out'].resolve()}/mlflow.db"
    assert sweep["uri"].startswith("sqlite:////")
    location = sweep["client"].get_experiment(sweep["exp"]).artifact_location
    assert location == (sweep["out"].resolve() / "mlartifacts" / "sit-test").as_uri()


def test_experiment_creation_is_idempotent(sweep):
    assert tracking.ensure_experiment(sweep["uri"], "sit-test") == sweep["exp"]


def test_experiment_creation_survives_a_race(sweep, monkeypatch):
    # Another process creates the experiment between our lookup and our create.
    real = MlflowClient.get_experiment_by_name
    calls = []
    monkeypatch.setattr(MlflowClient, "get_experiment_by_name",
                        lambda self, name: calls.append(name) or (real(self, name) if len(calls) > 1 else None))
    assert tracking.ensure_experiment(sweep["uri"], "sit-test") == sweep["exp"]
    assert len(calls) == 2


def test_children_are_nested_under_the_parent(sweep):
    runs = sweep["client"].search_runs(
        [sweep["exp"]], f"tags.mlflow.parentRunId = '{sweep['parent']}'")
    assert {r.info.run_id for r in runs} == set(sweep["children"].values())


def test_epoch_history_has_one_point_per_epoch(sweep):
    history = sweep["client"].get_metric_history(sweep["children"]["a"], "loss")
    assert sorted(m.step for m in history) == list(range(EPOCHS))


def test_final_metric_wins_over_last_epoch_value(sweep):
    run = sweep["client"].get_run(sweep["children"]["b"])
    assert run.data.metrics["top1"] == pytest.approx(0.6)  # final, not the last epoch's 0.3
    assert "host" not in run.data.metrics


def test_failed_trial_has_status_and_reason(sweep):
    run = sweep["client"].get_run(sweep["children"]["c"])
    assert run.info.status == "FAILED"
    assert run.data.tags["sit.failure"] == "RuntimeError: out of memory"


def test_speed_record_splits_into_params_and_metrics(sweep):
    data = sweep["client"].get_run(sweep["children"]["a"]).data
    assert data.metrics["speed.p50_ms"] == SPEED["p50_ms"]
    assert data.params["speed.device"] == "cpu"
    assert json.loads(data.params["speed.img_size"]) == list(SPEED["img_size"])


def test_relogging_a_trial_reuses_its_run(sweep):
    again = tracking.log_trial(sweep["uri"], sweep["exp"], sweep["parent"], "a", {"lr": 1e-3},
                               [{"epoch": 0, "top1": 0.0}], {"top1": 0.0})
    assert again == sweep["children"]["a"]
    assert len(sweep["client"].get_metric_history(again, "top1")) == EPOCHS + 1  # nothing added


def test_retry_of_a_failed_trial_completes_the_same_run(tmp_path):
    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "retry")
    parent = tracking.start_parent_run(uri, exp, "s", {}, {})
    first = tracking.log_trial(uri, exp, parent, "t", {"lr": 0.1}, [{"epoch": 0, "loss": 2.0}],
                               {}, status="FAILED", failure="boom")
    second = tracking.log_trial(uri, exp, parent, "t", {"lr": 0.1},
                                [{"epoch": 0, "loss": 9.0}, {"epoch": 1, "loss": 1.0}], {"top1": 0.7})
    run = MlflowClient(uri).get_run(second)
    assert second == first and run.info.status == "FINISHED"
    assert "sit.failure" not in run.data.tags
    history = {m.step: m.value for m in MlflowClient(uri).get_metric_history(second, "loss")}
    assert history == {0: 2.0, 1: 1.0}  # epoch 0 kept from the first attempt
    # A resumed sweep reopens its parent run rather than making a second one.
    MlflowClient(uri).set_terminated(parent, "KILLED")
    assert tracking.start_parent_run(uri, exp, "s", {"new": 1}, {}) == parent
    assert MlflowClient(uri).get_run(parent).info.status == "RUNNING"
    with pytest.raises(LookupError):
        tracking.resume_parent_run(uri, exp, "never-ran")


def test_pareto_tags(sweep):
    ids = sweep["children"]
    tracking.tag_pareto(sweep["uri"], sweep["parent"], list(ids.values()), {ids["b"]})
    tags = {t: sweep["client"].get_run(r).data.tags["sit.pareto"] for t, r in ids.items()}
    assert tags == {"a": "false", "b": "true", "c": "false"}
    with pytest.raises(ValueError, match="trial ids"):
        tracking.tag_pareto(sweep["uri"], sweep["parent"], list(ids.values()), {"b"})


def test_parent_summary_artifacts_and_hypervolume_series(sweep, tmp_path):
    csv, png = tmp_path / "pareto.csv", tmp_path / "pareto.png"
    pd.DataFrame({"trial_id": ["b"], "top1": [0.6]}).to_csv(csv, index=False)
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    hv = pd.DataFrame({"trial_number": [0, 1, 2], "hypervolume": [0.1, 0.3, 0.3],
                       "n_pareto": [1, 2, 2]})
    for _ in range(2):  # a resumed sweep logs its summary again: no duplicate points
        tracking.log_parent_summary(sweep["uri"], sweep["parent"], csv, png, hv, {"n_trials": 3})
    client = sweep["client"]
    names = {f.path for f in client.list_artifacts(sweep["parent"])}
    assert names == {"pareto.csv", "pareto.png", "hypervolume_history.csv"}
    history = client.get_metric_history(sweep["parent"], "hypervolume")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(i + 1, v) for i, v in enumerate(hv["hypervolume"])]
    assert client.get_run(sweep["parent"]).data.metrics["hypervolume"] == hv["hypervolume"].iloc[-1]


def test_trial_table_round_trips(sweep):
    table = tracking.trial_table(sweep["uri"], sweep["exp"], sweep["parent"]).set_index("tags.sit.trial_id")
    assert set(table.index) == {"a", "b", "c"}
    assert table.loc["a", "run_id"] == sweep["children"]["a"]
    assert float(table.loc["b", "params.model.schedule.keep"]) == pytest.approx(0.6)
    assert table.loc["b", "params.model.name"] == "vit"
    assert table.loc["b", "metrics.latency_ms"] == pytest.approx(9.0)
    assert table.loc["c", "status"] == "FAILED"


def test_resolve_tracking_uri_precedence_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert tracking.resolve_tracking_uri(None, tmp_path) == tracking.default_tracking_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000/")
    assert tracking.resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri("https://mlflow.example", tmp_path) == "https://mlflow.example"
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri("sqlite:///rel/m.db", "x") == f"sqlite:///{tmp_path.resolve()}/rel/m.db"
    for bad in ["mlruns", str(tmp_path), "file:///tmp/mlruns", "sqlite:///:memory:", "ftp://x"]:
        with pytest.raises(ValueError):
            tracking.resolve_tracking_uri(bad, tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-out is honoured
    assert tracking.resolve_tracking_uri("mlruns", tmp_path) == (tmp_path.resolve() / "mlruns").as_uri()


def test_ui_command():
    assert "--backend-store-uri sqlite:////x/mlflow.db" in tracking.mlflow_ui_command("sqlite:////x/mlflow.db")
    assert tracking.mlflow_ui_command("http://h:5000") == "http://h:5000"
