"""Trials sized from what the cluster CAN hold (its autoscaler's node types x max_workers), asked of
the autoscaler at once, and refused in one line when no node can ever hold them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from sweeps import cluster
from sweeps.cluster import Capacity, ClusterError, NodeType, Workers, shape_trials

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
HEAD = {"Alive": True, "NodeID": "h", "Resources": {"CPU": 8.0, "memory": 3e10, "object_store_memory": 1e10,
                                                    "node:__internal_head__": 1.0, "node:10.0.0.1": 1.0}}


@pytest.fixture
def aws():
    """The project's cluster.yaml as the head reads it, with the head alive (8 CPUs)."""
    return cluster._config_capacity(str(CLUSTER_YAML), [HEAD])


def write_config(tmp_path, config: dict) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_capacity_of_the_projects_cluster_yaml(aws):
    types = {t.name: t for t in aws.types}
    assert aws.autoscaling and aws.max_worker_nodes == 8 and aws.spot
    assert types["head_cpu"].head and types["head_cpu"].resources == {"CPU": 8.0}  # `resources: {}`: the live head
    assert types["gpu_1x_a10g"].resources == {"CPU": 4.0, "GPU": 1.0} and types["gpu_1x_a10g"].spot
    assert types["gpu_4x_a10g"].max_count == 2 and not types["gpu_4x_a10g"].spot
    # 8 workers at most: both 4-GPU nodes and 6 of the 1-GPU ones, not 2 x 4 + 8 x 1
    assert aws.most("GPU") == 2 * 4 + 6 * 1
    assert aws.most("CPU") == 8 + 2 * 48 + 6 * 4


def test_one_gpu_trials_fill_every_gpu_the_autoscaler_can_add_and_get_their_cpus(aws):
    shape = shape_trials(aws, num_workers=1, gpu=True)
    assert shape.concurrent == 14  # an empty cluster (head only) would have said 1
    assert shape.workers == Workers(1, True, 4, "PACK")  # the smallest CPUs-per-GPU share: fits both GPU types
    assert shape.bundles == [{"CPU": 4, "GPU": 1}]
    assert shape.retries == cluster.SPOT_TRIAL_RETRIES  # spot nodes in the cluster
    assert shape_trials(aws, num_workers=1, gpu=True, trials=6).concurrent == 6  # no more than the sweep's trials


@pytest.mark.parametrize("n, trials, cpus", [(2, 4, 12), (4, 2, 12)])
def test_multi_gpu_trials_are_strictly_packed_on_a_node_that_holds_them(aws, n, trials, cpus):
    shape = shape_trials(aws, num_workers=n, gpu=True, trial_cpu=0.1)
    assert shape.workers.placement == "STRICT_PACK" and shape.workers.cpus_per_worker == cpus
    assert shape.concurrent == trials  # only the two 4-GPU nodes can hold them
    assert shape.bundles == [{"CPU": cpus * n, "GPU": n}, {"CPU": 0.1}]  # one node-sized bundle per trial
    scaling = shape.workers.scaling()
    assert scaling.placement_strategy == "STRICT_PACK" and scaling.num_workers == n
    assert scaling.resources_per_worker == {"CPU": cpus, "GPU": 1}


def test_a_trial_larger_than_any_node_is_packed_as_tightly_as_possible(aws):
    shape = shape_trials(aws, num_workers=9, gpu=True)
    assert shape.workers.placement == "PACK" and shape.concurrent == 1 and len(shape.bundles) == 9


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_workers=15, gpu=True), "--workers 15 --gpu needs 15 GPUs per trial but the cluster can have at most 14"),
    (dict(num_workers=1, gpu=True, cpus_per_worker=64), "--cpus-per-worker 64: no GPU node has 64 CPUs"),
])
def test_requests_the_cluster_can_never_hold_fail_in_one_line(aws, kwargs, message):
    with pytest.raises(ClusterError) as e:
        shape_trials(aws, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_gpu_on_a_cluster_without_gpu_types_fails_fast(tmp_path):
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    for name in ("gpu_1x_a10g", "gpu_4x_a10g"):
        config["available_node_types"][name]["resources"] = {"CPU": 4}
    cap = cluster._config_capacity(write_config(tmp_path, config), [HEAD])
    with pytest.raises(ClusterError, match="--gpu: no node of this cluster has a GPU, and it cannot get one"):
        shape_trials(cap, num_workers=1, gpu=True)


def test_more_concurrent_trials_than_fit_are_allowed_with_a_note(aws):
    shape = shape_trials(aws, num_workers=4, gpu=True, concurrent=5)
    assert shape.concurrent == 5 and "can run 2 such trial(s) at once; the rest wait" in shape.note


def test_a_fixed_cluster_is_sized_from_its_live_nodes():
    gpu = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0, "node:10.0.0.2": 1.0, "accelerator_type:A10G": 1.0}}
    cap = cluster._live_capacity([HEAD, gpu, gpu])  # read_capacity passes the alive nodes only
    assert not cap.autoscaling and cap.alive == 3 and not cap.spot
    assert cap.most("GPU") == 4
    shape = shape_trials(cap, num_workers=2, gpu=True)
    assert shape.workers.placement == "STRICT_PACK" and shape.workers.cpus_per_worker == 4 and shape.concurrent == 2


def test_spot_is_recognised_for_aws_gcp_and_azure():
    assert cluster._is_spot({"InstanceMarketOptions": {"MarketType": "spot"}})
    assert cluster._is_spot({"scheduling": {"preemptible": True}})
    assert cluster._is_spot({"scheduling": {"provisioningModel": "SPOT"}})
    assert cluster._is_spot({"priority": "Spot"})
    assert not cluster._is_spot({"InstanceType": "g5.xlarge"})


def test_a_broken_cluster_config_is_one_line(tmp_path):
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["gpu_1x_a10g"]["min_worker"] = 0  # typo: Ray's schema refuses it
    with pytest.raises(ClusterError, match="is not a valid Ray cluster config"):
        cluster._config_capacity(write_config(tmp_path, config), [HEAD])
    with pytest.raises(ClusterError, match="does not exist"):
        cluster._config_capacity(str(tmp_path / "none.yaml"), [HEAD])


def test_the_request_covers_every_concurrent_trial_and_is_withdrawn(aws, monkeypatch):
    import ray
    import ray.autoscaler.sdk as sdk
    calls = []
    monkeypatch.setattr(sdk, "request_resources", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    shape = shape_trials(aws, num_workers=4, gpu=True)
    assert cluster.request(shape, aws) == [{"CPU": 48, "GPU": 4}] * 2
    cluster.release(aws)
    assert calls == [{"bundles": [{"CPU": 48, "GPU": 4}] * 2}, {"bundles": []}]
    fixed = Capacity([NodeType("live-0", {"CPU": 2.0}, 1)])
    assert cluster.request(shape, fixed) is None  # nothing to ask of a cluster without an autoscaler
    cluster.release(fixed)
    assert len(calls) == 2


def test_counts_respect_the_global_worker_cap():
    cap = Capacity([NodeType("head", {"CPU": 2.0}, 1, head=True), NodeType("small", {"GPU": 1.0}, 5),
                    NodeType("big", {"GPU": 8.0}, 1)], max_worker_nodes=3, autoscaling=True)
    assert [(t.name, n) for t, n in cap.counts(lambda t: t.has("GPU"))] == [("head", 1), ("big", 1), ("small", 2)]
    assert cap.most("GPU") == 10


def test_pareto_gpu_on_a_cpu_only_machine_exits_2_in_one_line(tmp_path):
    """A local Ray with no GPU (this machine): `--gpu` stops before any trial, nothing written."""
    from fake_cluster import kill_pids, pids_using

    private = tempfile.mkdtemp(prefix="sit-gpu-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": private, "RAY_TMPDIR": private,
           "SIT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "out"
    try:
        result = subprocess.run([sys.executable, str(ROOT / "sweeps" / "pareto.py"), "--smoke-test", "--gpu",
                                 "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    finally:
        kill_pids(pids_using(private))
        shutil.rmtree(private, ignore_errors=True)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "--gpu: no node of this cluster has a GPU" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not out.exists()



def test_cpu_trials_share_the_live_cpus(monkeypatch):
    import ray
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    live = Capacity([NodeType("live-0", {"CPU": 8.0}, 1)])
    four = shape_trials(live, num_workers=1, gpu=False)
    assert four.concurrent == 4 and four.workers == Workers(1, False, 1.9) and four.retries == 0
    two = shape_trials(live, num_workers=1, gpu=False, trials=2)  # two trials get the CPUs four would share
    assert two.concurrent == 2 and two.workers.cpus_per_worker == 3.8
    with pytest.raises(ClusterError, match=r"4 run\(s\) x \(0.1 \+ 2 x 2 CPU\) exceed the cluster's 8 CPUs"):
        shape_trials(live, num_workers=2, gpu=False, cpus_per_worker=2, concurrent=4, trial_cpu=0.1)
