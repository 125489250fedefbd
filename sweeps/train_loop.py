"""The Ray Train worker function: distil one candidate (or train its teacher) with DDP.

Ray glue around `sit_core.train`: this worker's device, data shard and DDP wrapper, metric and
checkpoint reports through Ray Train, resume from the latest checkpoint when Ray restarts it.
`config` carries one serialised `DistillJob`, the mode and the teacher's weights.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager, nullcontext

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import Subset

from sit_core.config import DistillJob
from sit_core.data import eval_loader, load_splits, train_loader
from sit_core.train import EVAL_BATCH, Trainer, device_batches, distill_task, run_epochs, steps_per_epoch, teacher_task

from .node_lock import NodeLock

STATE_FILE = "state.pt"   # what resuming needs: trainable weights (no frozen teacher), optimiser, step
MODEL_FILE = "model.pt"   # the inference model only (no RTSM, no teacher): what cards ship


def train_func(config: dict) -> None:
    job = DistillJob.from_dict(config["job"])
    teacher_mode = config.get("mode") == "teacher"
    recipe = job.teacher_train if teacher_mode else job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cpus = _match_threads_to_reserved_cpus()
    torch.manual_seed(recipe.seed)  # same init on every rank; DDP also broadcasts rank 0's weights

    splits = load_splits(job.data)
    pin = device.type == "cuda"
    per_worker, _ = device_batches(recipe, world)  # the global batch split exactly; the Trainer caps each forward
    loader = ray.train.torch.prepare_data_loader(train_loader(splits.train, per_worker, cpus=cpus, pin_memory=pin))
    # exact shards (no sampler padding), decoded by the worker's spare CPUs like the training batches
    val = eval_loader(Subset(splits.val, range(rank, len(splits.val), world)), EVAL_BATCH, cpus=cpus,
                      pin_memory=pin, persistent=True)
    test = eval_loader(Subset(splits.test, range(rank, len(splits.test), world)), EVAL_BATCH, cpus=cpus,
                       pin_memory=pin)

    start = _teacher_state(config["teacher"]) if config.get("teacher") is not None else None  # fine-tune: its start
    task = teacher_task(job, start) if teacher_mode else distill_task(job, start, splits.train)
    trainer = Trainer(task, recipe, steps_per_epoch=steps_per_epoch(recipe, len(loader)), device=device,
                      model=ray.train.torch.prepare_model(task.net), reduce=_all_reduce, world=world)
    start_epoch = _restore(ray.train.get_checkpoint(), trainer)
    log = print if rank == 0 else None
    if log:
        log(f"[{config.get('mode', 'distill')}] {job.name}: {recipe.epochs} epoch(s) x {trainer.steps_per_epoch} steps "
            f"on {world} worker(s) ({device.type}), starting at epoch {start_epoch + 1}")

    extend = config.get("extend_report") or (lambda m: m)  # a sweep trial adds its objectives

    def report(metrics: dict, last: bool) -> None:
        metrics["resumed_from_epoch"] = start_epoch
        if last:
            metrics.update(_replica_report(task.inference_model, world))
        metrics = extend(metrics)
        if rank != 0:  # only rank 0 writes; every rank must still call report (it is a barrier)
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({**trainer.state_dict(), "epoch": metrics["epoch"]}, os.path.join(tmp, STATE_FILE))
            torch.save(task.inference_model.state_dict(), os.path.join(tmp, MODEL_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{metrics['epoch']:04d}")

    guard = ProbeGuard(NodeLock(), ctx.get_local_rank(), world) if config.get("probe_lock") else nullcontext
    run_epochs(trainer, loader, val, test, start_epoch=start_epoch, report=report, guard=guard, log=log)


class ProbeGuard:
    """Keeps a node's end-to-end speed probes (`--latency measure`) and this run's compute apart
    without deadlocking DDP: only each node's local rank 0 takes the node lock (shared); a barrier
    then holds every rank until all hold what they need, so no rank waits on the lock while a peer
    waits for it inside a collective."""

    def __init__(self, lock: NodeLock, local_rank: int, world: int):
        self.lock, self.local_rank, self.world = lock, local_rank, world

    @contextmanager
    def __call__(self):
        with self.lock.shared() if self.local_rank == 0 else nullcontext():
            if self.world > 1:
                dist.barrier()
            yield


def _match_threads_to_reserved_cpus() -> float:
    """Fractional CPU reservations leave torch's default (all cores) in every worker: concurrent
    trials then oversubscribe the cores and crawl. One thread per reserved core, at least one."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, round(cpus)))  # 1.9 reserved of 2 cores: 2 threads
    return cpus


def _teacher_state(teacher):
    """The teacher's weights: an object-store reference (no shared filesystem needed) or a local path."""
    if isinstance(teacher, ray.ObjectRef):
        return ray.get(teacher)
    return torch.load(teacher, map_location="cpu", weights_only=True)


def _all_reduce(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return value


def _replica_report(model, world: int) -> dict:
    """Which node each rank ran on, and a checksum of each rank's weights (DDP keeps them equal)."""
    checksum = float(sum(p.double().sum().item() * (i + 1) for i, p in enumerate(model.parameters())))
    mine = {"node": ray.get_runtime_context().get_node_id(), "checksum": checksum}
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    return {"worker_nodes": [e["node"] for e in everyone], "weight_checksums": [e["checksum"] for e in everyone]}


def _restore(checkpoint, trainer: Trainer) -> int:
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
    trainer.load_state_dict(state)
    return int(state["epoch"])
