"""sweeps.tracking against a real SQLite MLflow store: one sweep, three trials, read back."""

import json

import pandas as pd
import pytest
from mlflow import MlflowClient

from sweeps import tracking

EPOCHS = 3
T0 = 1_700_000_000_000  # epoch results arrive a minute apart


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One store, one sweep: trials a, b (finished), c (failed after one epoch), d (stopped early).
    Driven as the sweep's Tune callback drives it: start, one log per epoch as it arrives, end."""
    out = tmp_path_factory.mktemp("sweep")
    uri = tracking.default_tracking_uri(out)
    exp = tracking.ensure_experiment(uri, "sit-test")
    parent = tracking.start_parent_run(uri, exp, "sweep-1", {"budget": {"trials": 3}}, {"k": "v"})
    children = {}
    for i, tid in enumerate(["a", "b", "c", "d"]):
        run = tracking.start_trial_run(uri, exp, parent, tid, f"tsm 2,4@0.{5 + i} #{i}",
                                       params={"model": {"schedule": {"keep": 0.5 + 0.1 * i}, "name": "vit"}, "lr": 1e-3},
                                       tags={"sit.trial_number": i})
        epochs = 1 if tid in ("c", "d") else EPOCHS
        for e in range(1, epochs + 1):
            tracking.log_epoch(uri, run, {"top1": 0.1 * (e + i), "latency_ms": 10.0 - i, "loss": 1.0 / e, "host": "n1",
                                          "feasible": True}, step=e, timestamp_ms=T0 + 60_000 * e)
        status = {"c": "FAILED", "d": "KILLED"}.get(tid, "FINISHED")
        tracking.end_trial_run(uri, run, status, failure="RuntimeError: out of memory" if tid == "c" else None,
                               tags={"sit.checkpoint": f"/ckpt/{tid}"})
        children[tid] = run
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


def test_epoch_history_has_one_point_per_epoch_with_its_real_time(sweep):
    history = sorted(sweep["client"].get_metric_history(sweep["children"]["a"], "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, EPOCHS + 1))
    assert [m.timestamp for m in history] == [T0 + 60_000 * e for e in range(1, EPOCHS + 1)]
    run = sweep["client"].get_run(sweep["children"]["a"])
    assert "host" not in run.data.metrics and "feasible" not in run.data.metrics  # not numbers
    assert run.data.metrics["top1"] == pytest.approx(0.3)  # the latest epoch's value


def test_runs_are_named_and_end_with_their_status(sweep):
    runs = {t: sweep["client"].get_run(r) for t, r in sweep["children"].items()}
    assert runs["a"].info.run_name == "tsm 2,4@0.5 #0"
    assert {t: r.info.status for t, r in runs.items()} == {"a": "FINISHED", "b": "FINISHED", "c": "FAILED",
                                                            "d": "KILLED"}
    assert runs["c"].data.tags["sit.failure"] == "RuntimeError: out of memory"
    assert runs["d"].data.tags["sit.checkpoint"] == "/ckpt/d"
    assert all(r.info.end_time >= r.info.start_time for r in runs.values())


def test_a_run_is_live_while_its_trial_trains(tmp_path):
    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "live")
    parent = tracking.start_parent_run(uri, exp, "s", {}, {})
    run = tracking.start_trial_run(uri, exp, parent, "t", "tsm 1@0.5 #0", params={"lr": 0.1})
    tracking.log_epoch(uri, run, {"top1": 50.0}, step=1)
    live = MlflowClient(uri).get_run(run)
    assert live.info.status == "RUNNING" and live.data.metrics["top1"] == 50.0


def test_a_resumed_trial_reopens_its_run_and_logs_no_step_twice(tmp_path):
    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "retry")
    parent = tracking.start_parent_run(uri, exp, "s", {}, {})
    first = tracking.start_trial_run(uri, exp, parent, "t", "tsm 1@0.5 #0", params={"lr": 0.1})
    tracking.log_epoch(uri, first, {"loss": 2.0}, step=1)
    tracking.end_trial_run(uri, first, "FAILED", failure="boom")
    second = tracking.start_trial_run(uri, exp, parent, "t", "tsm 1@0.5 #0", params={"lr": 0.1})
    assert second == first and MlflowClient(uri).get_run(second).info.status == "RUNNING"
    for step, loss in ((1, 9.0), (2, 1.0)):  # epoch 1 replayed from the checkpoint, then epoch 2
        tracking.log_epoch(uri, second, {"loss": loss}, step=step)
    tracking.end_trial_run(uri, second, "FINISHED")
    run = MlflowClient(uri).get_run(second)
    assert run.info.status == "FINISHED" and "sit.failure" not in run.data.tags
    history = {m.step: m.value for m in MlflowClient(uri).get_metric_history(second, "loss")}
    assert history == {1: 2.0, 2: 1.0}  # epoch 1 kept from the first attempt
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
    assert tags == {"a": "false", "b": "true", "c": "false", "d": "false"}
    with pytest.raises(ValueError, match="trial ids"):
        tracking.tag_pareto(sweep["uri"], sweep["parent"], list(ids.values()), {"b"})


def test_parent_summary_artifacts_and_hypervolume_history_only(sweep, tmp_path):
    csv, png = tmp_path / "pareto.csv", tmp_path / "pareto.png"
    pd.DataFrame({"trial_id": ["b"], "top1": [0.6]}).to_csv(csv, index=False)
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    hv = pd.DataFrame({"trial_number": [0, 1, 2], "hypervolume": [0.1, 0.3, 0.3], "n_pareto": [1, 2, 2],
                       "finished_ms": [T0 + 1000, T0 + 2000, T0 + 3000]})
    hv_csv = tmp_path / "hypervolume_history.csv"
    hv.to_csv(hv_csv, index=False)
    for _ in range(2):  # a resumed sweep logs its summary again: no duplicate points
        tracking.log_parent_summary(sweep["uri"], sweep["parent"], [csv, png, hv_csv], hv, {"n_trials": 3})
    client = sweep["client"]
    names = {f.path for f in client.list_artifacts(sweep["parent"])}
    assert names == {"pareto.csv", "pareto.png", "hypervolume_history.csv"}
    history = sorted(client.get_metric_history(sweep["parent"], "hypervolume"), key=lambda m: m.step)
    # no step-0 summary value: the series starts at the first trial and ends at the final value
    assert [(m.step, m.value, m.timestamp) for m in history] == \
        [(i + 1, v, t) for i, (v, t) in enumerate(zip(hv["hypervolume"], hv["finished_ms"]))]
    assert client.get_run(sweep["parent"]).data.metrics["hypervolume"] == hv["hypervolume"].iloc[-1]


def test_trial_table_round_trips(sweep):
    table = tracking.trial_table(sweep["uri"], sweep["exp"], sweep["parent"]).set_index("tags.sit.trial_id")
    assert set(table.index) == {"a", "b", "c", "d"}
    assert table.loc["a", "run_id"] == sweep["children"]["a"]
    assert float(table.loc["b", "params.model.schedule.keep"]) == pytest.approx(0.6)
    assert table.loc["b", "params.model.name"] == "vit"
    assert table.loc["b", "metrics.latency_ms"] == pytest.approx(9.0)
    assert table.loc["d", "status"] == "KILLED"
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


def test_the_experiment_opens_as_model_training_unless_its_owner_chose(tmp_path):
    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "kind")
    client = MlflowClient(uri)
    assert client.get_experiment(exp).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(exp, tracking.EXPERIMENT_KIND_TAG, "genai_development")
    tracking.ensure_experiment(uri, "kind")
    assert client.get_experiment(exp).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_shared_view_is_stored_the_ui_way_and_linked(sweep):
    url = tracking.share_run_view(sweep["uri"], sweep["exp"], "pareto-s1", search_filter="tags.`sit.pareto` = 'true'",
                                  columns=["metrics.top1", "metrics.latency_ms", "params.lr"], order_by="metrics.top1",
                                  group_by_tag="sit.role")
    assert url == (f"http://127.0.0.1:5000/#/experiments/{sweep['exp']}/runs?viewStateShareKey=pareto-s1"
                   "&workflowType=machine_learning")
    state = json.loads(sweep["client"].get_experiment(sweep["exp"]).tags["mlflow.sharedViewState.pareto-s1"])
    assert state == {"searchFilter": "tags.`sit.pareto` = 'true'",
                     "selectedColumns": ["metrics.`top1`", "metrics.`latency_ms`", "params.`lr`"],
                     "columnOrder": ["metrics.`top1`", "metrics.`latency_ms`", "params.`lr`"],
                     "orderByKey": "metrics.`top1`", "orderByAsc": False,
                     "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "sit.role"}]}}
    # MLflow's own parser takes the stored filter
    assert {r.data.tags["sit.trial_id"] for r in sweep["client"].search_runs([sweep["exp"]], state["searchFilter"])
            } <= set(sweep["children"])
    with pytest.raises(ValueError):
        tracking.share_run_view(sweep["uri"], sweep["exp"], "bad key", search_filter="", columns=[])
    with pytest.raises(ValueError):
        tracking.share_run_view(sweep["uri"], sweep["exp"], "k", search_filter="", columns=["top1"])


def test_links_to_the_ui():
    assert tracking.run_list_url("http://h:5000", "3", "tags.`sit.pareto` = 'true'") == (
        "http://h:5000/#/experiments/3/runs?searchFilter=tags.%60sit.pareto%60%20%3D%20%27true%27"
        "&workflowType=machine_learning")
    assert tracking.run_url("sqlite:////x/mlflow.db", "3", "abc") == \
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert tracking.run_url("http://h:5000", "3", "abc", artifact="pareto.html") == \
        "http://h:5000/#/experiments/3/runs/abc/artifacts/pareto.html?workflowType=machine_learning"


def test_a_run_ends_when_its_trial_ended_and_known_steps_are_not_read_again(tmp_path, monkeypatch):
    uri = tracking.default_tracking_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "times")
    parent = tracking.start_parent_run(uri, exp, "s", {}, {})
    run = tracking.start_trial_run(uri, exp, parent, "t", "tsm 1@0.5 #0", params={})
    start = MlflowClient(uri).get_run(run).info.start_time
    tracking.log_epoch(uri, run, {"loss": 2.0}, step=1, timestamp_ms=start + 10)
    reads = []
    monkeypatch.setattr(tracking, "_last_step", lambda *a: reads.append(a) or None)
    tracking.log_epoch(uri, run, {"loss": 1.0}, step=2, timestamp_ms=start + 20, logged_through=1)
    tracking.log_epoch(uri, run, {"loss": 9.0}, step=2, timestamp_ms=start + 30, logged_through=2)  # a replay
    assert reads == []
    tracking.end_trial_run(uri, run, "FINISHED", end_time_ms=start + 25)
    info = MlflowClient(uri).get_run(run).info
    assert info.end_time == start + 25 and info.status == "FINISHED"
    history = MlflowClient(uri).get_metric_history(run, "loss")
    assert sorted((m.step, m.value, m.timestamp) for m in history) == [(1, 2.0, start + 10), (2, 1.0, start + 20)]
