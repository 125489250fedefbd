"""sweeps.serving and the trials' latency oracles: latency tasks run where the model will serve.

On a private local Ray instance: the table, the end-to-end measurement and the probe run as tasks on
this node, and a request nothing can serve fails with one line. On a simulated 2-node cluster
(ray.cluster_utils.Cluster, one node advertising `inference_cpu`): the tasks run on that node, and
an unqualified CPU request is refused instead of landing on the head by accident."""
from __future__ import annotations

import pytest

from conftest import ray_env
from sit_core import latency
from sit_core.config import ModelSpec, SpeedSpec
from sweeps.serving import ServingTarget, _ensure_table, _measure
from sweeps.speed_probe import LatencyModel, Prober

TINY = ModelSpec("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=3,
                                              num_heads=2))
SPEED = SpeedSpec(batch_size=2, warmup=1, iters=2, threads=1)


def test_latency_tasks_run_on_this_node_by_default(ray_local, tmp_path):
    ray = ray_local
    target = ServingTarget.locate(SPEED)
    assert target.node_id == ray.get_runtime_context().get_node_id() and target.threads == 1
    assert "this node" in target.describe()

    table = target.ensure_table(TINY, ["tsm"], directory=str(tmp_path), protocol=latency.QUICK)
    assert table.fingerprint["threads"] == 1 and list(tmp_path.glob("*.json"))
    model = LatencyModel(table)
    student = model(TINY.with_schedule("1@0.5"))
    assert student["latency_ms"] == pytest.approx(table.predict("tsm:1@0.5"))
    assert student["speedup"] == pytest.approx(table.predict("none") / student["latency_ms"])
    assert student["gmacs"] > 0 and student["params_m"] > 0

    records = target.measure({"teacher": TINY, "student": TINY.with_schedule("1@0.5")}, rounds=2)
    assert set(records) == {"teacher", "student"} and records["student"].rounds == 2

    probed = Prober(target, cache_dir=str(tmp_path / "probes"))(TINY.with_schedule("1@0.5"))
    assert {"latency_ms", "speedup", "gmacs", "params_m"} <= set(probed)
    assert len(list((tmp_path / "probes").glob("*.json"))) == 1  # cached by architecture


def test_a_request_nothing_serves_fails_with_one_line(ray_local):
    with pytest.raises(ValueError, match="no node of this Ray cluster offered inference_cpu: 1 within 2 s"):
        ServingTarget.locate(SPEED, "inference_cpu", wait_s=2, log=lambda s: None)
    with pytest.raises(ValueError, match="trials train on GPUs but CPU latency would be timed on this node"):
        ServingTarget.locate(SPEED, trains_on_gpu=True)
    # one node alive now, but an autoscaler may add more: the head is not the serving node by default
    with pytest.raises(ValueError, match=r"this Ray cluster has up to 3 nodes \(autoscaling\): say which one serves"):
        ServingTarget.locate(SPEED, cluster_nodes=3)


@pytest.mark.slow
def test_latency_tasks_run_on_the_node_with_the_serving_resource(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    (tmp_path / "locks").mkdir()
    ray_env(monkeypatch, tmp_path / "locks")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        serving = cluster.add_node(num_cpus=1, resources={"inference_cpu": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        try:
            head = ray.get_runtime_context().get_node_id()
            assert serving.node_id != head
            with pytest.raises(ValueError, match="this Ray cluster has 2 nodes: say which one serves the model"):
                ServingTarget.locate(SPEED)
            target = ServingTarget.locate(SPEED, "inference_cpu")
            assert target.node_id == serving.node_id
            table = target.ensure_table(TINY, ["tsm"], directory=str(tmp_path), protocol=latency.QUICK)
            assert table.predict("tsm:1@0.5") > 0
            records = target.measure({"teacher": TINY}, rounds=1)
            assert records["teacher"].samples == 1
            # the tasks themselves report the node they ran on
            options = target.options()
            _, node = ray.get(_ensure_table.options(**options).remote(TINY, SPEED, ["tsm"], str(tmp_path),
                                                                      latency.QUICK))
            assert node == serving.node_id
            _, node = ray.get(_measure.options(**options).remote({"teacher": TINY}, SPEED, 1))
            assert node == serving.node_id
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
