"""Where latency is modelled and measured: the serving hardware, reached through Ray tasks.

A sweep trains wherever Ray places its trials, but a latency is worth what the hardware it was
timed on is worth. So the latency table, the end-to-end confirmation of the front and (with
`--latency measure`) every probe run as Ray tasks that request the serving hardware:
  * `--latency-resource NAME`: a custom resource that only serving nodes advertise (cluster.yaml's
    `serving_cpu` node type advertises `inference_cpu: 1`), or Ray's own `node:<ip>` (one node) or
    `node:__internal_head__` (the head, on purpose);
  * a GPU (num_gpus=1, so no trial trains on it meanwhile) when the serving device is cuda, timed
    in the job's serving dtype;
  * else the driver's node. That is refused where it would be an accident: on a cluster of
    several nodes, or when trials train on GPUs this node does not have (a GPU cluster's head).
The first task finds a node that fits; every later one is pinned to that node, so the table and
the confirmation time the same machine. A task asks for one unit of the resource (a serving node
advertising one runs one timing at a time) and no CPU (a serving node may advertise `CPU: 0` so
that no training lands on it); it times with the job's threads, else every core of its node.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sit_core import latency
from sit_core.config import ModelSpec, SpeedSpec
from sit_core.speed import SpeedRecord

WAIT_S = 900  # how long to wait for a serving node (an autoscaler launching and setting one up takes minutes)


def _here() -> str:
    return ray.get_runtime_context().get_node_id()


# Every task returns (result, the node it ran on): the caller checks it got the serving node.

@ray.remote(num_cpus=0, max_retries=0)
def _where(device: str) -> tuple[dict, str]:
    from sit_core.speed import device_name, node_threads
    return {"device_name": device_name(device), "cores": node_threads()}, _here()


@ray.remote(num_cpus=0, max_retries=0)
def _ensure_table(spec: ModelSpec, speed: SpeedSpec, reducers: Sequence[str], directory: Optional[str],
                  protocol: latency.Protocol) -> tuple[latency.LatencyTable, str]:
    # progress lines go to this task's stdout, which Ray forwards to the driver
    table = latency.ensure_table(spec, speed, reducers, directory=directory, protocol=protocol,
                                 log=lambda line: print(line, flush=True))
    return table, _here()


@ray.remote(num_cpus=0, max_retries=0)
def _measure(specs: Mapping[str, ModelSpec], speed: SpeedSpec,
             rounds: Optional[int]) -> tuple[dict[str, SpeedRecord], str]:
    return latency.measure_models(specs, speed, rounds=rounds), _here()


@ray.remote(num_cpus=0, max_retries=0)
def _call(fn: Callable, *args, **kwargs) -> tuple[object, str]:
    return fn(*args, **kwargs), _here()


@dataclasses.dataclass(frozen=True)
class ServingTarget:
    """The node (and device) latency is timed on; picklable into trials."""

    speed: SpeedSpec
    resource: Optional[str]
    node_id: str
    device_name: str
    threads: Optional[int]      # CPU threads timings use there (None on a GPU)

    @classmethod
    def locate(cls, speed: SpeedSpec, resource: Optional[str] = None, *, trains_on_gpu: bool = False,
               cluster_nodes: int = 0, wait_s: float = WAIT_S,
               log: Callable[[str], None] = print) -> "ServingTarget":
        """Find the serving node (Ray must be initialised). Raises ValueError, one line, where the
        request is ambiguous or nothing in the cluster serves it within `wait_s`. `cluster_nodes`: the
        most nodes the cluster can have (an autoscaler's config), when more than are alive now."""
        here = _here()
        if resource is None and speed.device == "cpu":
            nodes = [n for n in ray.nodes() if n["Alive"]]
            if max(len(nodes), cluster_nodes) > 1:
                many = f"{len(nodes)} nodes" if len(nodes) > 1 else f"up to {cluster_nodes} nodes (autoscaling)"
                raise ValueError(f"this Ray cluster has {many}: say which one serves the model with "
                                 "--latency-resource NAME (a resource of the serving node type, e.g. inference_cpu "
                                 "in cluster.yaml; node:<ip> for one node)")
            if trains_on_gpu and not any(n["Resources"].get("GPU") for n in nodes if n["NodeID"] == here):
                raise ValueError("trials train on GPUs but CPU latency would be timed on this node, which has none "
                                 "(a cluster's head?): say where the model serves with --latency-resource NAME, "
                                 "or serve on a GPU (--speed-device cuda)")
        options = cls._request(speed, resource)
        if resource is None and speed.device == "cpu":
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(here, soft=False)
        want = ", ".join([f"{resource}: 1"] * bool(resource) + ["GPU: 1"] * (speed.device == "cuda")) or "this node"
        if resource and resource not in ray.cluster_resources():
            log(f"latency: no node advertises {resource!r} yet; waiting up to {wait_s:.0f} s for one (an autoscaling "
                "cluster starts it)")
        ref = _where.options(**options).remote(speed.device)
        ready, _ = ray.wait([ref], timeout=wait_s)
        if not ready:
            ray.cancel(ref, force=True)
            raise ValueError(f"no node of this Ray cluster offered {want} within {wait_s:.0f} s for the latency "
                             f"tasks: check --latency-resource / the serving device (cluster resources: "
                             f"{_resource_names()})")
        found, node_id = ray.get(ref)
        threads = None if speed.device == "cuda" else (speed.threads or found["cores"])
        return cls(speed, resource, node_id, found["device_name"], threads)

    @staticmethod
    def _request(speed: SpeedSpec, resource: Optional[str]) -> dict:
        options: dict = {"num_cpus": 0}
        if resource:
            options["resources"] = {resource: 1}
        if speed.device == "cuda":
            options["num_gpus"] = 1
        return options

    def options(self) -> dict:
        """ray.remote options: the serving request, pinned to the node found by `locate`."""
        return {**self._request(self.speed, self.resource),
                "scheduling_strategy": NodeAffinitySchedulingStrategy(self.node_id, soft=False)}

    def describe(self) -> str:
        where = f"{self.threads} threads" if self.threads else f"{self.speed.dtype} on the GPU"
        via = f"resource {self.resource!r}" if self.resource else ("a GPU" if self.speed.device == "cuda" else "this node")
        return (f"{self.device_name} [{self.speed.device}, {where}], batch {self.speed.batch_size}, node "
                f"{self.node_id[:12]} (chosen by {via})")

    # ------------------------------------------------------------------ the tasks

    def ensure_table(self, spec: ModelSpec, reducers: Sequence[str], *, directory: Optional[str] = None,
                     protocol: latency.Protocol = latency.Protocol()) -> latency.LatencyTable:
        """The backbone's latency table, loaded or built on the serving node (`latency.ensure_table`)."""
        return self._run(_ensure_table, spec, self.speed, list(reducers), directory, protocol)

    def measure(self, specs: Mapping[str, ModelSpec], rounds: Optional[int] = None) -> dict[str, SpeedRecord]:
        """Every model timed end to end, interleaved (`latency.measure_models`), on the serving node."""
        return self._run(_measure, dict(specs), self.speed, rounds)

    def call(self, fn: Callable, *args, **kwargs):
        """Any function run on the serving node (the `--latency measure` probe)."""
        return self._run(_call, fn, *args, **kwargs)

    def _run(self, task, *args, **kwargs):
        result, node_id = ray.get(task.options(**self.options()).remote(*args, **kwargs))
        if node_id != self.node_id:  # hard node affinity makes this impossible; a number from elsewhere is worse
            raise RuntimeError(f"a latency task ran on node {node_id}, not on the serving node {self.node_id}")
        return result


def _resource_names() -> str:
    names = sorted(k for k in ray.cluster_resources() if not k.startswith(("node:", "memory", "object_store")))
    return ", ".join(names) or "none"
