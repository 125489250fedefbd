"""The GPU cluster path at the scheduling level, on Ray's fake multi-node autoscaler (no GPU here).

One head (1 CPU, no GPU) and an autoscaler config with a GPU node type ({CPU: 1, GPU: 1}, 0 to 4
nodes) and a serving type ({CPU: 1, inference_cpu: 1}): the sweep joins an empty cluster, sizes
its trials from the config (3 trials, 3 at a time), asks the autoscaler for them, and the fake
provider starts GPU "nodes" (raylets on this machine; the GPUs are only accounted: every trial
trains CPU tensors and never calls CUDA), while the latency table and the confirmation of the front
run on the serving node the autoscaler starts for `--latency-resource inference_cpu`. Mid-run, one trial's node is reclaimed the way a spot
node is: drained for PREEMPTION by `sweeps.spot_watch.drain_node`, then killed. Tune must resume
that trial from its checkpoint on the shared `--out` (a file:// URI) on another node without
counting a failure (its max_failures is 0 here: no spot node types), and every trial ends ok with
only its newest two checkpoints, each without the frozen teacher.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import tiny_job
from fake_cluster import FakeCluster, kill_pids, pids_using
from sit_core.config import override

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GPU_NODE = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 4}
SERVING_NODE = {"resources": {"CPU": 1, "inference_cpu": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}
TIMEOUT = 900


def trial_dirs(out: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out, "ray", "*", "run_trial_*")))


def results_of(trial_dir: str) -> list[dict]:
    path = os.path.join(trial_dir, "result.json")
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def catch_a_trial_mid_run(out: str, proc, deadline: float):
    """A trial that has checkpointed its first epoch and not its last: (dir, node id, pid)."""
    while time.time() < deadline and proc.poll() is None:
        for d in trial_dirs(out):
            reports = results_of(d)
            if reports and glob.glob(os.path.join(d, "checkpoint_000000")) and not glob.glob(os.path.join(d, "checkpoint_000002")):
                return d, reports[-1]["trial_node"], reports[-1]["pid"]
        time.sleep(0.1)
    return None


@pytest.fixture(scope="module")
def sweep_on_fake_cluster():
    assert not torch.cuda.is_available()  # the point: GPUs accounted by Ray, none behind them
    tmp = tempfile.mkdtemp(prefix="sit-fc-", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    job = override(tiny_job(epochs=3), {"data.train_subset": 2048, "train.max_steps_per_epoch": 30})
    config = os.path.join(tmp, "job.yaml")
    Path(config).write_text(yaml.safe_dump(job.to_dict()))
    teacher = os.path.join(tmp, "teacher.pt")  # random weights: scheduling is the point
    torch.save(job.model.build_teacher().state_dict(), teacher)
    cluster = FakeCluster(tmp, node_types={"gpu_node": GPU_NODE, "serving_cpu": SERVING_NODE}, max_workers=5)
    out = os.path.join(tmp, "shared", "out")
    log = Path(tmp, "pareto.log")
    caught = drained = None
    try:
        env = {**cluster.start(), "SIT_CACHE_DIR": os.path.join(tmp, "cache"), "PYTHONPATH": str(ROOT)}
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "sweeps" / "pareto.py"), "--config", config, "--gpu", "--trials", "3",
                 "--teacher-checkpoint", teacher, "--address", cluster.address, "--cluster-config", cluster.config_path,
                 "--out", f"file://{out}", "--shared-out", "--latency-resource", "inference_cpu",
                 # every trial trains all 3 epochs: a trial MO-ASHA stops after epoch 1 could end between being
                 # caught mid-run and being frozen, and the checkpoint checks below count 3 epochs
                 "--scheduler", "none",
                 # the fake nodes' raylets do not inherit SIT_CACHE_DIR: the table goes to shared storage, as on a cluster
                 "--latency-table-dir", os.path.join(tmp, "shared", "latency")], cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            deadline = time.time() + TIMEOUT
            caught = catch_a_trial_mid_run(out, proc, deadline)
            if caught:
                from sweeps.spot_watch import drain_node
                _, node, pid = caught
                os.kill(pid, signal.SIGSTOP)  # frozen: it cannot finish between the check and the reclaim
                drained = drain_node(cluster.address, node, 5, "spot interruption (test)")
                kill_pids(cluster.node_pids(node))  # the instance goes away
            rc = proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"the sweep did not finish in {TIMEOUT}s:\n{log.read_text()[-4000:]}")
        yield {"rc": rc, "log": log.read_text(), "out": out, "caught": caught, "drained": drained}
    finally:
        cluster.stop()
        assert not pids_using(tmp)


def test_an_empty_autoscaling_cluster_scales_out_for_concurrent_trials(sweep_on_fake_cluster):
    run = sweep_on_fake_cluster
    assert run["rc"] == 0, run["log"][-6000:]
    log = run["log"]
    assert "joined Ray cluster" in log and "(1 node(s), 1 CPU, 0 GPU)" in log  # the head alone at the start
    assert "asked the autoscaler for 3 bundle(s): 3 trial(s) at once, 1 worker(s) of 1 CPU + 1 GPU each" in log
    assert "sweep pareto-fmnist-cpu: 3 trials, 3 at a time" in log
    out = run["out"]
    table = pd.read_csv(os.path.join(out, "pareto.csv"), dtype={"trial_id": str})
    assert len(table) == 3 and (table["status"] == "ok").all(), table.to_string()

    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")  # the published snapshot of the driver's local store
    exp = client.get_experiment_by_name("sit-pareto")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sit.role") == "trial"]
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    # all three trained at once: every one started before any ended
    assert max(r.info.start_time for r in runs) < min(r.info.end_time for r in runs)
    nodes = {d: {r["trial_node"] for r in results_of(d)} for d in trial_dirs(out)}
    assert len(set().union(*nodes.values())) >= 3, nodes  # one GPU node per trial, added by the autoscaler


def test_a_preempted_node_costs_its_trial_no_failure_and_it_resumes_from_the_shared_checkpoint(sweep_on_fake_cluster):
    run = sweep_on_fake_cluster
    assert run["rc"] == 0, run["log"][-6000:]
    assert run["caught"], "no trial was caught between its first and last checkpoint"
    assert run["drained"] == (True, "")
    victim_dir, victim_node, _ = run["caught"]
    reports = results_of(victim_dir)
    assert reports[-1]["epoch"] == 3 and reports[-1]["status"] == "ok"
    assert reports[-1]["resumed_from_epoch"] >= 1  # from its checkpoint on the shared path, not from scratch
    assert reports[-1]["trial_node"] != victim_node
    assert "Trial task failed for trial" in run["log"]  # the reclaim happened, and Tune recovered it


def test_checkpoints_on_the_shared_path_keep_the_newest_two_without_the_teacher(sweep_on_fake_cluster):
    run = sweep_on_fake_cluster
    assert run["rc"] == 0, run["log"][-6000:]
    out = run["out"]
    for d in trial_dirs(out):
        kept = sorted(os.path.basename(p) for p in glob.glob(os.path.join(d, "checkpoint_*")))
        assert kept == ["checkpoint_000001", "checkpoint_000002"], (d, kept)  # 3 epochs, Tune keeps 2
        state = torch.load(os.path.join(d, "checkpoint_000002", "state.pt"), map_location="cpu", weights_only=False)
        assert not [k for k in state["model"] if k.startswith("teacher.")]
        assert any(k.startswith("rtsm.") for k in state["model"]) and "optimizer" in state
    for name in ("sweep.json", "pareto.csv", "pareto.png", "hypervolume_history.csv", "optuna.db", "mlflow.db"):
        assert os.path.isfile(os.path.join(out, name)), name  # published from the driver's local disk
    assert glob.glob(os.path.join(out, "cards", "*.yaml"))


def test_latency_is_timed_on_the_serving_node_type_never_where_trials_train(sweep_on_fake_cluster):
    run = sweep_on_fake_cluster
    assert run["rc"] == 0, run["log"][-6000:]
    assert "(chosen by resource 'inference_cpu')" in run["log"] and "latency table: built in" in run["log"]
    out = run["out"]
    assert len(glob.glob(os.path.join(os.path.dirname(out), "latency", "*.json"))) == 1  # where the sweep said
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("sit-pareto")
    parent, = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sit.role") == "sweep"]
    serving = parent.data.tags["sit.latency_node"]
    trained_on = {r["trial_node"] for d in trial_dirs(out) for r in results_of(d)}
    assert serving not in trained_on, (serving, trained_on)
    table = pd.read_csv(os.path.join(out, "pareto.csv"))
    assert table["latency_measured_ms"].notna().any()  # the front was confirmed there
