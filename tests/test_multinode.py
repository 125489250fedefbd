"""DDP across two Ray nodes: a 2-node cluster on this machine (one CPU each), one worker per node.

One CPU per node and one CPU per worker leave Ray no choice but to put a replica on each node, so
this exercises what a real cluster does: the teacher travels through the object store (no shared
filesystem for it), gloo all-reduces between the nodes, and the replicas stay identical.
"""
from __future__ import annotations

import time

import pytest

from conftest import ray_env, tiny_job

pytestmark = pytest.mark.slow


@pytest.fixture
def two_node_cluster(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # no other Ray instance in this process
    (tmp_path / "locks").mkdir()
    ray_env(monkeypatch, tmp_path / "locks")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        try:
            yield cluster
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


def test_ddp_spreads_over_two_nodes_and_keeps_replicas_identical(two_node_cluster, tmp_path):
    import ray
    from sweeps.runner import Workers, fit

    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2 and all(n["Resources"].get("CPU") == 1.0 for n in alive)

    job = tiny_job()
    teacher_ref = ray.put(job.model.build_teacher().state_dict())  # random teacher: the plumbing is the point
    t0 = time.perf_counter()
    out = fit(job, mode="distill", teacher=teacher_ref,
              workers=Workers(num_workers=2, use_gpu=False, cpus_per_worker=1.0),
              storage_path=str(tmp_path.resolve() / "runs"), run_name="two-nodes", max_failures=0)
    seconds = time.perf_counter() - t0
    assert out.status == "ok", out.failure
    m = out.metrics
    nodes = m["worker_nodes"]
    assert len(nodes) == 2 and nodes[0] != nodes[1], nodes
    assert set(nodes) == {n["NodeID"] for n in alive}
    sums = m["weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1], sums  # DDP: bit-identical replicas after training
    assert m["train_loss"] == m["train_loss"] and m["train_loss"] > 0  # finite: it really trained
    assert seconds < 300  # generous: the machine is shared; a placement deadlock would hang far longer
