"""End to end: `python sweeps/pareto.py --smoke-test` as a user runs it (a subprocess, so Ray is
isolated), then its MLflow store, Pareto table and cards; resuming a killed sweep; infeasible
trials; a sweep over a simulated 2-node cluster.

Every sweep runs with its own TMPDIR/RAY_TMPDIR (a private Ray temp dir: it never joins a cluster
someone else started on this machine, and nobody joins ours) and its own NodeLock directory; Ray
processes left behind by a killed driver are found by that private directory and killed by pid.
All sweeps of the module share one cache (SIT_CACHE_DIR), so the smoke teacher is trained once.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from fake_cluster import pids_using  # processes naming our private temp dir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PARETO = str(ROOT / "sweeps" / "pareto.py")
EXPORT = str(ROOT / "sweeps" / "export.py")
EXPERIMENT = "sit-pareto"
SWEEP = "pareto-fmnist-cpu-smoke"
SWEEP_TIMEOUT = 900          # a hang (placement deadlock) fails the test instead of blocking CI


# ---------------------------------------------------------------- process plumbing

@pytest.fixture(scope="module")
def private_tmp():
    """A short private temp dir (Ray's unix socket paths must stay under ~107 characters)."""
    path = tempfile.mkdtemp(prefix="sit-e2e-", dir="/tmp")
    try:
        yield path
    finally:
        kill_processes_using(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("teacher_cache").resolve())


def sweep_env(private_tmp: str, cache_dir: str | None = None) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": private_tmp, "RAY_TMPDIR": private_tmp,
           "SIT_NODE_LOCK_DIR": os.path.join(private_tmp, "locks"), "PYTHONUNBUFFERED": "1"}
    if cache_dir:
        env["SIT_CACHE_DIR"] = cache_dir
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    os.makedirs(env["SIT_NODE_LOCK_DIR"], exist_ok=True)
    return env


def kill_processes_using(marker: str, timeout: float = 20) -> None:
    for pid in pids_using(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    while pids_using(marker) and time.time() < deadline:
        time.sleep(0.5)


def run_pareto(args: list[str], env: dict, log: Path, timeout: float = SWEEP_TIMEOUT) -> subprocess.CompletedProcess:
    """Run pareto.py to completion in its own session; on timeout kill the whole group."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, PARETO, *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"pareto.py {' '.join(args)} did not finish in {timeout}s; log {log}:\n"
                        + log.read_text()[-4000:])
    return subprocess.CompletedProcess(proc.args, rc, log.read_text(), "")


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-6000:]}"


# ---------------------------------------------------------------- reading a sweep back

def client(out) -> "MlflowClient":
    from mlflow import MlflowClient
    return MlflowClient(f"sqlite:///{Path(out).resolve()}/mlflow.db")


def all_runs(out) -> list:
    c = client(out)
    exp = c.get_experiment_by_name(EXPERIMENT)
    return c.search_runs([exp.experiment_id], max_results=1000) if exp else []


def parent_and_children(out):
    runs = all_runs(out)
    parents = [r for r in runs if r.data.tags.get("sit.role") == "sweep"]
    assert len(parents) == 1, [r.info.run_id for r in parents]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    strays = {r.info.run_id for r in runs} - {parent.info.run_id} - {r.info.run_id for r in children}
    assert not strays, f"runs outside the sweep's tree: {strays}"
    return parent, children


def finished_children(out) -> list:
    if not Path(out, "sweep.json").exists():  # written once the sweep created its MLflow store: never
        return []                             # race the driver's schema migrations on a new database
    try:
        return [r for r in all_runs(out)
                if r.data.tags.get("sit.role") == "trial" and r.info.status == "FINISHED"]
    except Exception:  # noqa: BLE001  (the database may be mid-creation)
        return []


def pareto_table(out) -> pd.DataFrame:
    return pd.read_csv(Path(out, "pareto.csv"), dtype={"trial_id": str})


def checkpoint_dirs(out) -> list[str]:
    """Tune's checkpoints of the in-process trials (one per reported epoch)."""
    return sorted(str(Path(p).relative_to(out)) for p in glob.glob(os.path.join(out, "ray", SWEEP, "*", "checkpoint_*")))


def tune_trial_status(out) -> dict:
    """trial id -> status from Tune's experiment state (what a resume reads)."""
    states = sorted(glob.glob(os.path.join(out, "ray", SWEEP, "experiment_state-*.json")))
    if not states:
        return {}
    try:
        data = json.loads(Path(states[-1]).read_text())
    except (OSError, ValueError):
        return {}
    status = {}
    for entry in data.get("trial_data", []):
        text = entry[0] if isinstance(entry, list) else entry
        trial = json.loads(text)
        status[trial["trial_id"]] = trial.get("status")
    return status


def hv_final(out) -> float:
    return float(pd.read_csv(Path(out, "hypervolume_history.csv"))["hypervolume"].iloc[-1])


def files_under(path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in Path(path).rglob("*") if p.is_file()}


# ---------------------------------------------------------------- the smoke sweep

@pytest.fixture(scope="module")
def smoke(tmp_path_factory, private_tmp, cache_dir):
    out = tmp_path_factory.mktemp("smoke") / "out"
    t0 = time.time()
    before = set(os.listdir(ROOT))
    result = run_pareto(["--smoke-test", "--out", str(out)], sweep_env(private_tmp, cache_dir), out.parent / "pareto.log")
    result.new_in_cwd = set(os.listdir(ROOT)) - before  # the sweep runs in ROOT: MLflow must write nothing there
    print(f"smoke sweep: {time.time() - t0:.0f}s")
    kill_processes_using(private_tmp)
    return out, result


def test_smoke_sweep_runs_and_reports(smoke):
    out, result = smoke
    assert_ok(result)
    text = result.stdout
    for expected in ("latency (model) on", "latency table for", "teacher:", "(predicted)", "confirming",
                     "Trials (Pareto-optimal marked):", "Pareto front (measured latency):", "hypervolume", "cards (",
                     "mlflow ui --backend-store-uri", "sweep finished"):
        assert expected in text, expected
    # the driver raised nothing (Ray's actors may log their own transient retries, prefixed "(Actor pid=...)")
    assert not re.search(r"^Traceback", text, re.M), text[-4000:]
    for name in ("pareto.csv", "pareto.png", "hypervolume_history.csv", "sweep.json", "mlflow.db"):
        assert Path(out, name).is_file(), name
    assert Path(out, "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pareto_table(out)
    # MO-ASHA is on by default: 2 epochs, one rung after epoch 1; the first trial there always goes on
    assert len(table) == 3 and table["trial_id"].is_unique and set(table["status"]) <= {"ok", "stopped"}
    ok, stopped = table[table["status"] == "ok"], table[table["status"] == "stopped"]
    assert len(ok) >= 1 and ok["full_budget"].all() and (ok["epoch"] == 2).all()
    assert (stopped["epoch"] == 1).all() and not stopped["full_budget"].any()
    assert not stopped["feasible"].any() and not stopped["pareto"].any(), "a stopped trial is never on the front"
    assert table["pareto"].any() and table.loc[table["pareto"], "feasible"].all()
    # the front was confirmed: every predicted-front trial measured end to end, the front recomputed on that,
    # and nothing on it measured slower than the teacher
    assert table.loc[table["pareto_predicted"], "latency_measured_ms"].notna().all()
    front = table[table["pareto"]]
    assert front["latency_measured_ms"].notna().all() and (front["speedup_measured"] > 1).all()
    assert (front["latency_iqr_ms"] >= 0).all() and front["teacher_latency_measured_ms"].nunique() == 1
    # the orchestration share is printed, and is the table's share over all trials
    share = re.search(r"orchestration share: ([\d.]+)% of trial wall time", text)
    assert share, text[-3000:]
    assert 0 <= float(share.group(1)) <= 100 and table["overhead_share"].between(0, 1).all()
    assert float(share.group(1)) == pytest.approx(
        100 * (1 - table["work_s"].sum() / table["wall_s"].sum()), abs=0.06)
    # the first trials are the warm starts: the DeiT schedule scaled to depth 4 (1,2,3) @ 0.7, then SiT's @ 0.5
    assert table.sort_values("trial_number")["schedule"].tolist()[:2] == ["tsm:1,2,3@0.7,0.7,0.7",
                                                                          "tsm:1,2,3@0.5,0.5,0.5"]
    hv = pd.read_csv(Path(out, "hypervolume_history.csv"))
    assert len(hv) == 3 and hv["hypervolume"].is_monotonic_increasing
    assert hv["hypervolume"].iloc[-1] == pytest.approx(_hypervolume_of(table, out))
    assert hv["n_pareto"].iloc[-1] == table["pareto"].sum()
    # every trial trained in its own process and checkpointed every epoch it trained
    assert len(checkpoint_dirs(out)) == int(table["epoch"].sum())


def _hypervolume_of(table, out):
    """Hypervolume of the measured front against chance and the teacher measured beside it."""
    from sweeps import pareto_front
    record = json.loads(Path(out, "sweep.json").read_text())
    teacher = float(client(out).search_runs([client(out).get_experiment_by_name(EXPERIMENT).experiment_id],
                                            "tags.`sit.role` = 'sweep'")[0].data.metrics["teacher_latency_ms"])
    assert teacher == pytest.approx(table["teacher_latency_measured_ms"].dropna().iloc[0])  # one teacher latency
    objectives = {("latency_measured_ms" if c == "latency_ms" else c): d for c, d in record["objectives"].items()}
    return pareto_front.hypervolume(table, objectives, {"top1": 10.0, "latency_measured_ms": teacher})


def test_the_front_is_optunas_best_trials(smoke):
    import optuna
    out, result = smoke
    assert_ok(result)
    table = pareto_table(out)
    study = optuna.load_study(study_name=SWEEP, storage=f"sqlite:///{out}/optuna.db")
    best = {t.user_attrs.get("tune_trial_id") for t in study.best_trials}
    assert best == set(table.loc[table["pareto_predicted"], "trial_id"])  # the front the search saw
    # stopped early = PRUNED in Optuna with the values it was stopped at; the others COMPLETE
    states = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert set(states) == set(table["trial_id"])
    for _, row in table.iterrows():
        t = states[row["trial_id"]]
        if row["status"] == "stopped":
            assert t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["last_epoch"] == row["epoch"]
            assert t.user_attrs["last_values"] == pytest.approx([row["top1"], row["latency_ms"]])
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE and t.values == pytest.approx([row["top1"], row["latency_ms"]])


def test_smoke_mlflow_parent_and_children(smoke):
    from sweeps import tracking

    out, result = smoke
    assert_ok(result)
    parent, children = parent_and_children(out)
    table = pareto_table(out)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sit.sweep_id"] == SWEEP
    assert parent.data.metrics["n_trials"] == 3 and parent.data.metrics["n_failed"] == 0
    assert parent.data.metrics["n_stopped"] == int((table["status"] == "stopped").sum())
    assert 0 <= parent.data.metrics["overhead_share"] <= 1
    assert parent.data.metrics["n_pareto"] == int(table["pareto"].sum())
    assert parent.data.metrics["n_confirmed"] == int(table["latency_measured_ms"].notna().sum()) >= 1
    assert parent.data.tags["sit.latency_node"] and "batch 16" in parent.data.tags["sit.latency_device"]
    hv_points = sorted(client(out).get_metric_history(parent.info.run_id, "hypervolume"), key=lambda m: m.step)
    assert [m.step for m in hv_points] == [1, 2, 3]  # one point per finished trial, no step-0 value
    assert hv_points[-1].value == pytest.approx(hv_final(out))
    params = parent.data.params
    assert params["latency"] == "model"
    assert (params["objectives.top1"], params["objectives.latency_ms"]) == ("max", "min")
    assert params["preset"] == "fmnist-cpu" and params["trials"] == "3" and params["sampler"] == "tpe"
    artifacts = {a.path for a in client(out).list_artifacts(parent.info.run_id)}
    assert {"pareto.csv", "pareto.png", "pareto.html", "hypervolume_history.csv", "sweep.json"} <= artifacts, artifacts
    assert "hypervolume" not in {m.key for m in client(out).get_metric_history(parent.info.run_id, "hypervolume")
                                 if m.step == 0}
    assert client(out).get_experiment_by_name(EXPERIMENT).tags["mlflow.experimentKind"] == "custom_model_development"

    # exactly one child per trial, nested under the parent
    assert len(children) == len(table) == 3
    by_trial = {r.data.tags["sit.trial_id"]: r for r in children}
    assert set(by_trial) == set(table["trial_id"])
    exp_id = tracking.ensure_experiment(f"sqlite:///{out}/mlflow.db", EXPERIMENT)
    tt = tracking.trial_table(f"sqlite:///{out}/mlflow.db", exp_id, parent.info.run_id)
    assert sorted(tt["tags.sit.trial_id"]) == sorted(table["trial_id"])

    c = client(out)
    for _, row in table.iterrows():
        run = by_trial[row["trial_id"]]
        stopped = row["status"] == "stopped"
        assert run.info.run_id == row["run_id"] and run.info.status == ("KILLED" if stopped else "FINISHED")
        assert run.data.tags["sit.stopped_early"] == str(stopped).lower()
        assert run.info.run_name == row["label"] and run.info.run_name.endswith(f"#{row['trial_number']}")
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["sit.pareto"] == ("true" if row["pareto"] else "false")
        assert Path(run.data.tags["sit.checkpoint"], "model.pt").is_file()
        assert json.loads(run.data.tags["sit.point"])["n_stages"] == int(run.data.params["n_stages"])
        # live: one point per epoch, logged when it arrived (increasing timestamps inside the run's span)
        history = sorted(c.get_metric_history(run.info.run_id, "val_top1"), key=lambda m: m.step)
        assert [m.step for m in history] == ([1] if stopped else [1, 2])
        stamps = [m.timestamp for m in history]
        # the run spans its training: opened before the first epoch ended, closed at the last report
        assert run.info.start_time < stamps[0] and stamps == sorted(set(stamps)) and stamps[-1] <= run.info.end_time
        m = run.data.metrics
        assert m["top1"] == pytest.approx(row["top1"]) and m["latency_ms"] == pytest.approx(row["latency_ms"])
        assert {"gmacs", "params_m", "work_s", "trial_wall_s", "speedup"} <= set(m) and ("test_top1" in m) == (not stopped)
        if pd.notna(row["latency_measured_ms"]):  # confirmed: measured latency, spread, speed-up, protocol
            for key in ("latency_measured_ms", "latency_iqr_ms", "latency_p25_ms", "latency_p75_ms",
                        "speedup_measured", "teacher_latency_measured_ms"):
                assert m[key] == pytest.approx(row[key]), key
            assert "interleaved" in json.loads(run.data.tags["sit.speed"])["protocol"]
        else:
            assert "latency_measured_ms" not in m


def test_smoke_cards_rebuild_the_trained_students(smoke):
    from sit_core.card import card_job, load_card, read_card

    out, result = smoke
    assert_ok(result)
    table = pareto_table(out)
    front = table[table["pareto"]]
    cards = sorted(Path(out, "cards").glob("*.yaml"))
    assert sorted(c.stem for c in cards) == sorted(f"tsm-{n}" for n in front["trial_number"])
    _, children = parent_and_children(out)
    by_run = {r.info.run_id: r for r in children}
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    for card in cards:
        meta = read_card(card)
        run = by_run[meta["mlflow"]["run_id"]]
        row = front[front["run_id"] == run.info.run_id].iloc[0]
        assert meta["metrics"]["top1"] == pytest.approx(row["top1"])
        assert meta["metrics"]["latency_ms"] == pytest.approx(row["latency_ms"])
        assert meta["metrics"]["latency_measured_ms"] == pytest.approx(row["latency_measured_ms"])
        assert meta["metrics"]["speedup_measured"] == pytest.approx(row["speedup_measured"])
        assert meta["metrics"]["speedup_measured"] > 1
        assert "interleaved" in meta["speed"]["protocol"] and meta["speed"]["batch_size"] == 16
        job = card_job(card)
        assert str(job.model.schedule) == row["schedule"]
        assert job.train.lr == pytest.approx(json.loads(run.data.tags["sit.point"])["lr"])
        loaded = load_card(card)
        rebuilt = job.model.build(pretrained=False)
        rebuilt.load_state_dict(torch.load(Path(run.data.tags["sit.checkpoint"], "model.pt"), map_location="cpu",
                                           weights_only=True), strict=True)
        rebuilt.eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), rebuilt(x)), card


def test_smoke_models_are_logged_registered_and_load_alike(smoke):
    """Every finished trial logged its student as an MLflow model with its card; the picks are
    registered with aliases; mlflow.pytorch.load_model and sit_core.load_card("models:/...@knee")
    give the same logits; the exported card and the logged one hold the same weights file."""
    import mlflow
    from mlflow import MlflowClient

    from sit_core.card import load_card, read_card
    from sit_core.files import file_sha256

    out, result = smoke
    assert_ok(result)
    uri = f"sqlite:///{Path(out).resolve()}/mlflow.db"
    c = MlflowClient(uri, registry_uri=uri)
    _, children = parent_and_children(out)
    table = pareto_table(out)
    for run in children:
        tags = run.data.tags
        if tags["sit.stopped_early"] == "true":  # stopped by MO-ASHA: not a finished student, no model logged
            assert "sit.model_uri" not in tags and not run.outputs.model_outputs
            continue
        assert [o.model_id for o in run.outputs.model_outputs] == [tags["sit.model_uri"].removeprefix("models:/")]
        assert tags["sit.card"] == f"{tags['sit.model_uri']}/extra_files/tsm-{tags['sit.trial_number']}.yaml"
        assert "sit.package_error" not in tags
    registered = c.get_registered_model(SWEEP)
    front_runs = set(table.loc[table["pareto"], "run_id"])
    assert {"knee", "fastest", "most-accurate"} <= set(registered.aliases)
    for alias, version in registered.aliases.items():
        assert c.get_model_version(SWEEP, str(version)).run_id in front_runs, alias
    knee = c.get_model_version_by_alias(SWEEP, "knee")
    knee_run = c.get_run(knee.run_id)
    # the card inside the logged model predates the confirmation: the version carries what it measured
    knee_row = table.set_index("run_id").loc[knee.run_id]
    assert float(knee.tags["sit.latency_measured_ms"]) == pytest.approx(knee_row["latency_measured_ms"], rel=1e-5)
    assert float(knee.tags["sit.speedup_measured"]) > 1.0
    torch.manual_seed(0)
    x = torch.randn(3, 1, 28, 28)
    mlflow.set_tracking_uri(uri)
    try:
        logged = mlflow.pytorch.load_model(knee_run.data.tags["sit.model_uri"])
    finally:
        mlflow.set_tracking_uri(None)
    rebuilt = load_card(f"models:/{SWEEP}@knee", tracking_uri=uri)
    with torch.no_grad():
        assert torch.equal(logged(x), rebuilt(x))
    # the card on disk is the knee's (same weights file, by sha256) and names its run, model, version
    card = Path(out, "cards", f"tsm-{knee_run.data.tags['sit.trial_number']}.yaml")
    meta = read_card(card)
    assert meta["mlflow"]["run_id"] == knee.run_id and meta["mlflow"]["model_uri"] == knee_run.data.tags["sit.model_uri"]
    assert meta["mlflow"]["registered_model"] == SWEEP and "knee" in meta["mlflow"]["aliases"]
    assert meta["weights"]["sha256"] == file_sha256(Path(knee_run.data.tags["sit.checkpoint"], "model.pt"))
    assert not result.new_in_cwd, f"the sweep wrote {result.new_in_cwd} into its working directory"


def test_smoke_cockpit_in_a_browser(smoke, tmp_path):
    """The links the sweep printed, opened in headless Chromium against `mlflow server` and
    `optuna-dashboard`: the Pareto view lists exactly the Pareto-optimal trials with their objectives,
    the all-trials view groups them, the parent's interactive plot runs inside MLflow's artifact
    viewer, and Optuna's dashboard shows the front (named objectives) and the hypervolume history.
    Screenshots go to $SIT_SCREENSHOTS (default: the test's tmp dir), for people to look at."""
    import cockpit_browser  # tests/ is on sys.path (pytest's rootdir-relative import)

    out, result = smoke
    assert_ok(result)
    table = pareto_table(out)
    shots = Path(os.environ.get("SIT_SCREENSHOTS") or tmp_path)
    pages = cockpit_browser.shoot_all(out, result.stdout, shots)
    for png, _ in pages.values():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print("screenshots:", *[str(png) for png, _ in pages.values()], sep="\n  ")
    pareto_dom, trials_dom = pages["mlflow-pareto"][1], pages["mlflow-trials"][1]
    for _, row in table.iterrows():
        assert (row["label"] in pareto_dom) == bool(row["pareto"]), row["label"]
        assert row["label"] in trials_dom
    for text in ("top1", "latency_ms", "Model registry"):  # the registry link: the model-training view
        assert text in pareto_dom, text
    assert "Evaluation runs" not in pareto_dom  # not the GenAI view
    assert "sit.pareto" in trials_dom  # grouped: Pareto-optimal apart from dominated
    assert "mlflow-html-iframe" in pages["mlflow-plot"][1]
    optuna_dom = pages["optuna"][1]
    for text in ("Pareto Front", "top1", "latency_ms", "Hypervolume history", SWEEP):
        assert text in optuna_dom, text


def test_export_knee_from_a_finished_sweep(smoke, tmp_path, private_tmp):
    out, result = smoke
    assert_ok(result)
    before_runs = {(r.info.run_id, r.info.status) for r in all_runs(out)}
    before_ray = files_under(Path(out, "ray"))
    cards_dir = tmp_path / "knee"
    r = subprocess.run([sys.executable, EXPORT, "--out", str(out), "--pick", "knee", "--cards-dir", str(cards_dir)],
                       cwd=tmp_path, env=sweep_env(private_tmp), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cards = sorted(cards_dir.glob("*.yaml"))
    assert len(cards) == 1 and r.stdout.strip().splitlines() == [str(cards[0])]
    table = pareto_table(out)
    assert cards[0].stem in {f"tsm-{n}" for n in table.loc[table["pareto"], "trial_number"]}
    # nothing re-ran: no new or changed run, no new file under the Ray results, no Ray process
    assert {(x.info.run_id, x.info.status) for x in all_runs(out)} == before_runs
    assert files_under(Path(out, "ray")) == before_ray
    assert "Started a local Ray instance" not in r.stdout + r.stderr
    # the default pick exports the front again, into the sweep's cards directory (same names)
    r = subprocess.run([sys.executable, EXPORT, "--out", str(out)], cwd=tmp_path, env=sweep_env(private_tmp),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.strip().splitlines()) == sorted(str(p) for p in Path(out, "cards").glob("*.yaml"))


# ---------------------------------------------------------------- kill, then --resume (all trials infeasible)

@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, private_tmp, cache_dir):
    """`--trials 3 --concurrent 1 --max-latency-ms 1e-6 --latency measure`: SIGKILL the driver's process
    group once one trial is finished (MLflow child FINISHED and Tune's state TERMINATED), then `--resume`."""
    out = tmp_path_factory.mktemp("resume") / "out"
    args = ["--smoke-test", "--out", str(out), "--trials", "3", "--concurrent", "1", "--max-latency-ms", "1e-6",
            "--latency", "measure"]
    env = sweep_env(private_tmp, cache_dir)
    log = out.parent / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, PARETO, *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + SWEEP_TIMEOUT
        done = []
        while time.time() < deadline and proc.poll() is None:
            done = finished_children(out)
            if done and tune_trial_status(out).get(done[0].data.tags["sit.trial_id"]) == "TERMINATED":
                break
            time.sleep(1)
        assert proc.poll() is None, "the sweep ended before it could be killed:\n" + log.read_text()[-4000:]
        assert done, "no trial finished in time:\n" + log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_processes_using(private_tmp)   # raylet, GCS, workers of the killed driver
    assert not pids_using(private_tmp)
    before = {
        "children": {r.data.tags["sit.trial_id"]: r for r in finished_children(out)},
        "checkpoints": checkpoint_dirs(out),
        "tune": tune_trial_status(out),
    }
    t0 = time.time()
    resumed = run_pareto(args + ["--resume"], env, out.parent / "resumed.log")
    print(f"resumed sweep: {time.time() - t0:.0f}s")
    kill_processes_using(private_tmp)
    return out, before, resumed


def test_resume_repeats_no_finished_trial(killed_then_resumed):
    out, before, resumed = killed_then_resumed
    assert_ok(resumed)
    assert "resuming" in resumed.stdout
    assert before["children"], "the kill came after a finished trial"
    table = pareto_table(out)
    assert len(table) == 3 and table["trial_id"].is_unique
    assert set(table["status"]) <= {"ok", "stopped"}, table[["trial_id", "status", "error"]].to_string()
    parent, children = parent_and_children(out)
    ids = [r.data.tags["sit.trial_id"] for r in children]
    assert len(children) == 3 and sorted(set(ids)) == sorted(ids) == sorted(table["trial_id"])
    assert parent.info.status == "FINISHED"
    by_trial = {r.data.tags["sit.trial_id"]: r for r in children}
    for trial_id, old in before["children"].items():
        new = by_trial[trial_id]
        assert new.info.run_id == old.info.run_id
        assert new.info.status == old.info.status == "FINISHED"
        assert new.info.end_time == old.info.end_time, "the finished child was logged again"
        assert new.data.metrics == old.data.metrics and new.data.params == old.data.params
        assert before["tune"][trial_id] == "TERMINATED"
    # the finished trial was not trained again: its checkpoints are the ones it had
    assert set(before["checkpoints"]) <= set(checkpoint_dirs(out))
    # Optuna's study holds each trial once
    import optuna
    study = optuna.load_study(study_name=SWEEP, storage=f"sqlite:///{out}/optuna.db")
    tagged = [t.user_attrs.get("tune_trial_id") for t in study.trials if t.state.is_finished()]
    assert sorted(tagged) == sorted(table["trial_id"])
    # trials stopped before or after the kill: PRUNED in Optuna, KILLED in MLflow, stopped in the table
    pruned = {t.user_attrs["tune_trial_id"] for t in study.trials if t.state == optuna.trial.TrialState.PRUNED}
    assert pruned == set(table.loc[table["status"] == "stopped", "trial_id"])
    assert pruned == {r.data.tags["sit.trial_id"] for r in children if r.info.status == "KILLED"}


def test_infeasible_trials_are_never_on_the_front(killed_then_resumed):
    """--max-latency-ms 1e-6: every trial is infeasible; the sweep still ends cleanly with no front."""
    out, _, resumed = killed_then_resumed
    assert_ok(resumed)
    table = pareto_table(out)
    assert not table["feasible"].any()
    assert not table["pareto"].any()
    assert "Pareto front: 0 of 3 trials" in resumed.stdout
    assert not list(Path(out).glob("cards/*.yaml")), "no card for an infeasible trial"
    parent, children = parent_and_children(out)
    assert all(r.data.tags["sit.pareto"] == "false" for r in children)
    assert parent.data.metrics["n_pareto"] == 0 and parent.data.metrics["hypervolume"] == 0
    # --latency measure: every trial probed end to end (cached by architecture), nothing left to confirm
    assert parent.data.params["latency"] == "measure" and "no feasible trial to confirm" in resumed.stdout
    assert table["latency_ms"].gt(0).all() and list(Path(out, "speed_cache").glob("*.json"))
    import optuna
    study = optuna.load_study(study_name=SWEEP, storage=f"sqlite:///{out}/optuna.db")
    assert study.best_trials == []
    assert all(t.constraints["latency_budget"] > 0 for t in study.trials if t.state.is_finished())
    # exporting the front of such a sweep is a clear error, not a traceback
    r = subprocess.run([sys.executable, EXPORT, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no feasible full-budget trial" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- two nodes

CLUSTER_SCRIPT = """
import signal, sys, time
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
serving = cluster.add_node(num_cpus=1, resources={"inference_cpu": 1})
cluster.wait_for_nodes()
print(cluster.address, serving.node_id, flush=True)
def stop(*_):
    cluster.shutdown()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(1)
"""


@pytest.fixture(scope="module")
def two_node_sweep(tmp_path_factory, cache_dir):
    """A 2-node Ray cluster on this machine (1 CPU each) in a process of its own, then a sweep joining it."""
    tmp = tempfile.mkdtemp(prefix="sit-2n-", dir="/tmp")
    env = sweep_env(tmp)
    cluster = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT], env=env, stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        address, serving_node = (cluster.stdout.readline().strip().split() + ["", ""])[:2]
        assert re.fullmatch(r"[\d.]+:\d+", address), f"cluster did not start: {address!r}"
        out = tmp_path_factory.mktemp("two_nodes") / "out"
        result = run_pareto(["--smoke-test", "--out", str(out), "--address", address, "--concurrent", "2",
                             "--trials", "2", "--latency-resource", "inference_cpu"], sweep_env(tmp, cache_dir),
                            out.parent / "pareto.log")
        yield out, result, serving_node
    finally:
        cluster.send_signal(signal.SIGTERM)
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(cluster.pid, signal.SIGKILL)
            cluster.wait()
        kill_processes_using(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_two_node_sweep_spreads_trials_over_both_nodes(two_node_sweep):
    out, result, serving_node = two_node_sweep
    assert_ok(result)
    assert "joined Ray cluster" in result.stdout and "2 node(s), 2 CPU" in result.stdout
    table = pareto_table(out)
    assert len(table) == 2 and set(table["status"]) <= {"ok", "stopped"}
    _, children = parent_and_children(out)
    nodes = [r.data.tags["sit.nodes"] for r in children]
    assert all(nodes) and len(set(nodes)) == 2, nodes
    # the latency table and the confirmation ran on the node advertising the serving resource
    parent, _ = parent_and_children(out)
    assert parent.data.tags["sit.latency_node"] == serving_node
