"""What the cluster can hold, and the shape of a sweep's trials on it.

An autoscaling cluster (`ray up cluster.yaml`, `min_workers: 0`) starts as its head alone: sizing
trials from the nodes alive now would find no GPU and run one trial at a time. So capacity is read
from what the cluster CAN have: the autoscaler's node types x their max_workers (its config: the
file `ray up` leaves on the head, or `--cluster-config`), capped by the global max_workers, plus the
nodes alive now. The sweep then asks the autoscaler for all its trials at once
(`ray.autoscaler.sdk.request_resources`, bypassing the upscaling speed) and gives the request back
when it ends. A trial no node can ever hold is refused here in one line; Ray would otherwise keep
it pending (and Ray Train retry its worker group) forever.

    cap = read_capacity()                                   # after ray.init
    shape = shape_trials(cap, num_workers=4, gpu=True)      # Workers, concurrency, bundles
    request(shape, cap); ...; release(cap)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import ray
import ray.train
from ray.train.torch import TorchConfig

# `ray up` copies the cluster config (resources filled in for the instance types) here on the head
# and starts the autoscaler with it (`ray start --autoscaling-config=~/ray_bootstrap_config.yaml`).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Resources that say nothing about what a trial can use.
_IGNORED = ("memory", "object_store_memory")
# Tune retries of a trial whose node died without a preemption notice (a drained, reclaimed spot
# node costs none: Tune and Ray Train count preemptions apart from failures).
SPOT_TRIAL_RETRIES = 2
# Most CPU trials at once when nothing else bounds them (one core each on a laptop).
MAX_CPU_TRIALS = 4


class ClusterError(ValueError):
    """A request the cluster cannot satisfy (one line, exit status 2)."""


@dataclass
class Workers:
    """How one distillation is spread: Ray Train workers, each one DDP replica."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement: str = "PACK"            # STRICT_PACK: every worker on one node (see shape_trials)

    def scaling(self) -> ray.train.ScalingConfig:
        resources = {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}
        return ray.train.ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                                       resources_per_worker=resources, placement_strategy=self.placement)

    def torch_config(self) -> TorchConfig:
        return TorchConfig(backend="nccl" if self.use_gpu else "gloo")


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict                # per node: CPU, GPU, custom resources
    max_count: int                 # nodes of this type the cluster can have at once
    head: bool = False
    spot: bool = False

    def has(self, resource: str) -> float:
        return float(self.resources.get(resource, 0))


@dataclass
class Capacity:
    """The node types a cluster can have, how many of each, and where that was read."""

    types: list[NodeType]
    max_worker_nodes: Optional[int] = None    # the autoscaler's cap on worker nodes of all types
    source: str = "the live cluster"
    autoscaling: bool = False                 # read from an autoscaler config: nodes can be added
    alive: int = 1                            # nodes alive now

    @property
    def spot(self) -> bool:
        return any(t.spot for t in self.types)

    def counts(self, key=lambda t: 1.0) -> list[tuple[NodeType, int]]:
        """Node types with how many nodes of each the cluster can hold at once, filling the global
        max_workers with the types that score highest on `key` first (e.g. GPUs per node)."""
        out, left = [], self.max_worker_nodes
        for t in sorted(self.types, key=lambda t: (not t.head, -key(t))):
            n = t.max_count if t.head or left is None else min(t.max_count, left)
            if not t.head and left is not None:
                left -= n
            if n > 0:
                out.append((t, n))
        return out

    def most(self, resource: str) -> float:
        """The most of `resource` the cluster can have at once."""
        return sum(t.has(resource) * n for t, n in self.counts(lambda t: t.has(resource)))

    def describe(self) -> str:
        types = ", ".join(f"{t.name} x{t.max_count} {_fmt(t.resources)}" for t in self.types)
        cap = f", at most {self.max_worker_nodes} workers" if self.max_worker_nodes is not None else ""
        return f"{self.source}: {types}{cap}"


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _useful(resources: dict) -> dict:
    return {k: float(v) for k, v in resources.items()
            if k not in _IGNORED and not k.startswith(("node:", "accelerator_type:")) and float(v) > 0}


def read_capacity(config_path: Optional[str] = None) -> Capacity:
    """The cluster's capacity: its autoscaler config (`config_path`, else the head's bootstrap
    config if there is one) with the live head's resources, else the nodes alive now."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    path = os.path.expanduser(config_path or BOOTSTRAP_CONFIG)
    if config_path is None and not os.path.isfile(path):
        return _live_capacity(alive)
    return _config_capacity(path, alive)


def _live_capacity(alive: list) -> Capacity:
    shapes: dict[tuple, list] = {}
    for node in alive:
        res = _useful(node.get("Resources", {}))
        shapes.setdefault(tuple(sorted(res.items())), []).append(node)
    types = [NodeType(f"live-{i}", dict(shape), len(nodes)) for i, (shape, nodes) in enumerate(shapes.items())]
    return Capacity(types, None, "the live cluster (no autoscaler config)", False, len(alive))


def _config_capacity(path: str, alive: list) -> Capacity:
    """Node types and counts as Ray's autoscaler reads them (AutoscalingConfig.get_node_type_configs:
    a worker type's max_workers, one head, all workers capped by the global max_workers),
    after the schema check `ray up` makes first. Read from the file itself: Ray's prepare step needs
    provider defaults that some providers (fake_multinode in Ray 2.60) do not ship."""
    import json

    import jsonschema
    import ray.autoscaler
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
        schema = json.loads(open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")).read())
        jsonschema.validate(raw, schema)
    except FileNotFoundError:
        raise ClusterError(f"--cluster-config {path} does not exist") from None
    except (yaml.YAMLError, jsonschema.ValidationError) as e:
        first = str(getattr(e, "message", e)).strip().splitlines()[0]
        raise ClusterError(f"cluster config {path} is not a valid Ray cluster config: {first}") from None
    node_types = raw.get("available_node_types") or {}
    head_name = next(iter(node_types)) if len(node_types) == 1 else raw.get("head_node_type")
    live_head = next((_useful(n["Resources"]) for n in alive if "node:__internal_head__" in n.get("Resources", {})), {})
    types = []
    for name, t in node_types.items():
        head = name == head_name
        resources = _useful(t.get("resources") or {})
        if head and not resources:  # `resources: {}`: Ray fills the head's in when it starts
            resources = live_head
        # the head is one node (Ray's prepare step sets its type's max_workers to 0)
        types.append(NodeType(name, resources, 1 if head else int(t.get("max_workers", 0)),
                              head=head, spot=_is_spot(t.get("node_config") or {})))
    return Capacity(types, raw.get("max_workers"), f"autoscaler config {path}", True, len(alive))


def _is_spot(node_config: dict) -> bool:
    """Spot/preemptible instances, as AWS, GCP and Azure node configs spell them."""
    aws = (node_config.get("InstanceMarketOptions") or {}).get("MarketType", "")
    gcp = node_config.get("scheduling") or {}
    return (aws.lower() == "spot" or bool(gcp.get("preemptible")) or gcp.get("provisioningModel") == "SPOT"
            or str(node_config.get("priority", "")).lower() == "spot")


@dataclass
class TrialShape:
    """What one trial asks for, how many run at once, and what the autoscaler is asked for."""

    workers: Workers
    concurrent: int
    bundles: list = field(default_factory=list)   # one trial's resource bundles
    retries: int = 0                              # Tune retries per trial (failures, not preemptions)
    note: str = ""

    def describe(self) -> str:
        w = self.workers
        each = f"{w.cpus_per_worker:g} CPU" + (" + 1 GPU" if w.use_gpu else "")
        return (f"{self.concurrent} trial(s) at once, {w.num_workers} worker(s) of {each} each"
                f"{f' ({w.placement})' if w.num_workers > 1 else ''}")


def shape_trials(cap: Capacity, *, num_workers: int, gpu: bool, cpus_per_worker: Optional[float] = None,
                 concurrent: Optional[int] = None, trial_cpu: float = 0.0, trials: Optional[int] = None) -> TrialShape:
    """Workers per trial and trials at once that fit `cap` (no more than `trials`, the sweep's total);
    raises ClusterError if none can."""
    if gpu:
        shape = _gpu_shape(cap, num_workers, cpus_per_worker, concurrent, trial_cpu)
    else:
        shape = _cpu_shape(num_workers, cpus_per_worker, concurrent, trial_cpu, trials)
    if trials and not concurrent:
        shape.concurrent = min(shape.concurrent, trials)
    shape.retries = SPOT_TRIAL_RETRIES if cap.spot else 0
    return shape


def _gpu_shape(cap, n, cpus_per_worker, concurrent, trial_cpu) -> TrialShape:
    gpu_types = [t for t in cap.types if t.has("GPU") >= 1]
    if not gpu_types:
        raise ClusterError(f"--gpu: no node of this cluster has a GPU, and it cannot get one ({cap.describe()}); "
                           "add a GPU node type or drop --gpu")
    most = cap.most("GPU")
    if n > most:
        raise ClusterError(f"--workers {n} --gpu needs {n} GPUs per trial but the cluster can have at most {most:g} "
                           f"({cap.describe()}): lower --workers")
    # STRICT_PACK: all of a trial's workers on one node (NVLink/PCIe, not the network; one spot reclaim
    # costs one node, not several) whenever a node type can hold them; else PACK (as few nodes as possible).
    strict = n > 1 and any(t.has("GPU") >= n for t in gpu_types)
    per_node = n if strict else 1
    hosts = [t for t in gpu_types if t.has("GPU") >= per_node]
    # A GPU worker gets its node's CPUs per GPU (DataLoader workers decode JPEGs): the smallest share
    # among the node types it may land on, so it fits all of them.
    cpus = cpus_per_worker or max(1, min(math.floor(t.has("CPU") / t.has("GPU")) for t in hosts))
    hosts = [t for t in hosts if t.has("CPU") >= cpus * per_node]
    if not hosts:
        raise ClusterError(f"--cpus-per-worker {cpus:g}: no GPU node has {cpus * per_node:g} CPUs for "
                           f"{per_node} GPU worker(s) ({cap.describe()})")
    per = {t.name: min(math.floor(t.has("GPU") / per_node), math.floor(t.has("CPU") / (cpus * per_node)))
           for t in hosts}
    fits = sum(per.get(t.name, 0) * k for t, k in cap.counts(lambda t: per.get(t.name, 0)))
    trials = fits if strict else fits // n
    workers = Workers(n, True, cpus, placement="STRICT_PACK" if strict else "PACK")
    bundles = ([{"CPU": cpus * n, "GPU": n}] if strict else [{"CPU": cpus, "GPU": 1}] * n)
    if n > 1 and trial_cpu:
        bundles = bundles + [{"CPU": trial_cpu}]
    return _with_concurrency(workers, bundles, max(1, trials), concurrent, cap)


def _cpu_shape(n, cpus_per_worker, concurrent, trial_cpu, trials) -> TrialShape:
    """CPU trials share the CPUs there are now (fractional reservations: a trial holding 1 CPU while
    its workers ask for 1 each never starts on a 2-core node). CPU sweeps are the laptop case: an
    autoscaler's CPU node types are not counted."""
    cpus = float(ray.cluster_resources().get("CPU", 1))
    fitted = concurrent or max(1, min(MAX_CPU_TRIALS, int(cpus), trials or MAX_CPU_TRIALS))
    per_worker = cpus_per_worker or round((cpus / fitted - trial_cpu) / n * 0.95, 3)
    if per_worker <= 0 or fitted * (trial_cpu + n * per_worker) > cpus + 1e-9:
        raise ClusterError(f"{fitted} run(s) x ({trial_cpu:g} + {n} x {per_worker:g} CPU) exceed the "
                           f"cluster's {cpus:g} CPUs: lower --concurrent, --workers or --cpus-per-worker")
    bundles = [{"CPU": per_worker}] * n + ([{"CPU": trial_cpu}] if trial_cpu else [])
    return TrialShape(Workers(n, False, per_worker), fitted, bundles)


def _with_concurrency(workers, bundles, fits: int, concurrent: Optional[int], cap: Capacity) -> TrialShape:
    note = ""
    if concurrent and concurrent > fits:
        note = f"--concurrent {concurrent}: the cluster can run {fits} such trial(s) at once; the rest wait"
    return TrialShape(workers, concurrent or fits, bundles, note=note)


def request(shape: TrialShape, cap: Capacity) -> Optional[list]:
    """Ask the autoscaler for every concurrent trial's resources now (nothing on a fixed cluster)."""
    if not cap.autoscaling:
        return None
    from ray.autoscaler.sdk import request_resources

    bundles = shape.bundles * shape.concurrent
    request_resources(bundles=bundles)
    return bundles


def release(cap: Capacity) -> None:
    """Withdraw the request, so idle nodes go back after `idle_timeout_minutes`."""
    if cap.autoscaling and ray.is_initialized():
        from ray.autoscaler.sdk import request_resources
        request_resources(bundles=[])
