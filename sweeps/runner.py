"""Orchestration every command shares: start or join Ray, size the workers, get the teacher into
the object store, and run one distillation on a `TorchTrainer`.

    session = Session.start(job, storage="/abs/runs/x", workers=1)  # Ray up, trials shaped, teacher ready
    outcome = session.distill(job, run_name="tsm-2,4@0.5")          # Ray Train, DDP
    session.release()                                               # the autoscaler request back
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import ray
import ray.train
from ray.train.torch import TorchTrainer

from sit_core import teachers
from sit_core.config import DistillJob
from sit_core.train import device_batches

from . import cluster, storage
from .cluster import Workers  # noqa: F401  (re-exported: trials and tests import it from here)
from .faults import kill_when
from .train_loop import MODEL_FILE, train_func

KEEP_CHECKPOINTS = 2  # the newest two: resume needs one, a crash while writing it leaves the other


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> str:
    """Join the running cluster (`address`, RAY_ADDRESS, or one started on this node), else start Ray here."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return "using the Ray instance already initialised in this process"
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None and Path(tempfile.gettempdir(), "ray", "ray_current_cluster").exists():
        address = "auto"  # `ray start` on this node leaves its address there
    runtime_env = {"worker_process_setup_hook": "sweeps.runner.quiet_worker_logs"}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return f"joined Ray cluster at {address} ({cluster_summary()})"
    # No dashboard: ~1 GB we do not spend on a laptop (and it needs ray[default]).
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env)
    return f"started a local Ray instance ({cluster_summary()})"


def quiet_worker_logs() -> None:
    """Runs in every Ray worker process. Without the dashboard Ray Train's placement-group cleaner
    warns every few seconds that the state API is unavailable."""
    import logging
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def cluster_summary() -> str:
    res = ray.cluster_resources()
    return f"{len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def size_workers(num_workers: int, gpu: bool, cpus_per_worker: Optional[float], *, concurrent: Optional[int] = None,
                 trial_cpu: float = 0.0, cluster_config: Optional[str] = None) -> Workers:
    """Workers such that `concurrent` runs of `num_workers` (plus `trial_cpu` each) fit the cluster
    (see `cluster.shape_trials`). Raises ClusterError (a ValueError) if they cannot fit."""
    cap = cluster.read_capacity(cluster_config)
    return cluster.shape_trials(cap, num_workers=num_workers, gpu=gpu, cpus_per_worker=cpus_per_worker,
                                concurrent=concurrent or 1, trial_cpu=trial_cpu).workers


@dataclass
class Outcome:
    """What one distillation produced."""

    status: str                       # ok | non_finite | error
    metrics: dict                     # last epoch's metrics (rank 0)
    history: list = field(default_factory=list)  # every epoch's metrics
    model_path: Optional[str] = None  # inference weights (no RTSM) of the last epoch, copied locally
    weights_uri: Optional[str] = None  # the same file where the run keeps it (under --out, or its bucket)
    failure: Optional[str] = None


def fit(job: DistillJob, *, mode: str, teacher=None, workers: Workers, storage_path: str, run_name: str,
        max_failures: int = 2, callbacks: tuple = (), probe_lock: bool = False,
        extend_report: Optional[Callable[[dict], dict]] = None) -> Outcome:
    """Run `train_func` on a TorchTrainer; a rerun with the same name/storage resumes its checkpoints."""
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"job": job.to_dict(), "mode": mode, "teacher": teacher, "probe_lock": probe_lock,
                           "extend_report": extend_report},
        torch_config=workers.torch_config(),
        scaling_config=workers.scaling(),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, callbacks=list(callbacks),
            # a drained (preempted) spot node is not a failure: Ray Train retries those without limit
            failure_config=ray.train.FailureConfig(max_failures=max_failures, max_preemption_failures=-1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        return Outcome(status="error", metrics={}, failure=_first_line_of_cause(e))
    history = sorted((m for _, m in (result.best_checkpoints or [])), key=lambda m: m.get("epoch", 0))
    metrics = dict(result.metrics or (history[-1] if history else {}))
    model_path = weights_uri = None
    if result.checkpoint is not None:
        local = Path(tempfile.mkdtemp(prefix=f"{run_name}-"), "final_model.pt")
        with result.checkpoint.as_directory() as d:
            shutil.copyfile(Path(d, MODEL_FILE), local)
        model_path = str(local)
        weights_uri = storage.join(storage.checkpoint_location(result.checkpoint), MODEL_FILE)
    return Outcome(status=metrics.get("status", "ok" if metrics else "empty"), metrics=metrics, history=history,
                   model_path=model_path, weights_uri=weights_uri, failure=metrics.get("failure"))


def _first_line_of_cause(error: Exception) -> str:
    """The worker's own exception line out of Ray's wrapped traceback."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    causes = [ln for ln in lines if not ln.startswith(("File ", "Traceback", "^", "[Rank")) and ":" in ln]
    return causes[-1] if causes else (lines[0] if lines else type(error).__name__)


@dataclass
class Session:
    """Ray started, trials shaped to the cluster (and asked of its autoscaler), the teacher's weights in
    the object store: what every command needs. `release()` gives the autoscaler request back."""

    workers: Workers
    storage: str                        # Ray Train/Tune storage (shared storage on a cluster)
    teacher: teachers.TeacherRecord
    teacher_ref: ray.ObjectRef
    shape: cluster.TrialShape
    capacity: cluster.Capacity

    @classmethod
    def start(cls, job: DistillJob, *, storage: str, workers: int = 1, gpu: bool = False,
              cpus_per_worker: Optional[float] = None, concurrent: Optional[int] = 1, trial_cpu: float = 0.0,
              trials: Optional[int] = None, address: Optional[str] = None, cluster_config: Optional[str] = None,
              before_teacher: Callable[[cluster.Capacity], None] = lambda cap: None,
              log: Callable[[str], None] = print) -> "Session":
        device_batches(job.train, workers)  # a batch that does not split over the workers: one line, now
        log(init_ray(address))
        cap = cluster.read_capacity(cluster_config)
        kwargs = dict(num_workers=workers, gpu=gpu, cpus_per_worker=cpus_per_worker, trial_cpu=trial_cpu)
        shape = cluster.shape_trials(cap, concurrent=concurrent, trials=trials, **kwargs)
        one = cluster.shape_trials(cap, concurrent=1, **{**kwargs, "trial_cpu": 0.0})  # the teacher's run
        before_teacher(cap)  # the caller's checks that need the cluster (shared --out), before anything runs
        if shape.note:
            log(shape.note)
        requested = cluster.request(shape, cap)
        if requested:
            log(f"asked the autoscaler for {len(requested)} bundle(s): {shape.describe()} ({cap.describe()})")
        try:
            teacher = ensure_teacher(job, workers=one.workers, storage=storage, log=log)
            teacher_ref = ray.put(teachers.teacher_state(job, teacher))
        except BaseException:
            cluster.release(cap)
            raise
        return cls(shape.workers, storage, teacher, teacher_ref, shape, cap)

    def distill(self, job: DistillJob, run_name: str, **kwargs) -> Outcome:
        return fit(job, mode="distill", teacher=self.teacher_ref, workers=self.workers, storage_path=self.storage,
                   run_name=run_name, **kwargs)

    def release(self) -> None:
        cluster.release(self.capacity)


def ensure_teacher(job: DistillJob, *, workers: Workers, storage: str, log=print) -> teachers.TeacherRecord:
    """The teacher's weights: the job's checkpoint file or timm's pretrained weights as they are, or a
    shipped or cached teacher trained (or fine-tuned from those weights) for this job, else trained
    (fine-tuned) now and cached."""
    if job.teacher_finetune == "none" and job.teacher_checkpoint:
        teachers.load_state(job, job.teacher_checkpoint)  # fail now, before any worker starts
        return teachers.TeacherRecord(Path(job.teacher_checkpoint), job.teacher_key(), {}, "checkpoint", {})
    if job.teacher_finetune == "none" and job.teacher_pretrained:  # loaded (and checked) by the caller
        path = None if job.teacher_pretrained == "timm" else Path(job.teacher_pretrained)
        return teachers.TeacherRecord(path, job.teacher_key(), {}, "pretrained", {})
    found = teachers.find(job)
    if found is not None:
        log(f"teacher: {found.source} {found.path} (config {found.key}, val top-1 "
            f"{found.metrics.get('val_top1', float('nan')):.2f}%, test {found.metrics.get('test_top1', float('nan')):.2f}%)")
        return found
    return train_teacher(job, workers=workers, storage=storage, dest=teachers.cached_path(job), log=log)


def train_teacher(job: DistillJob, *, workers: Workers, storage: str, dest: Path, log=print,
                  **record) -> teachers.TeacherRecord:
    recipe = job.teacher_train
    start, what = None, "training"
    if job.teacher_finetune != "none":  # fine-tune the user's weights (a fresh head if the classes differ)
        weights = teachers.start_weights(job)
        start, what = ray.put(weights.state), f"fine-tuning ({job.teacher_finetune}) {weights.source}:"
        started = {"finetune": job.teacher_finetune, "source": weights.source, "weights": job.teacher_source(),
                   "head_trained": weights.head_trained, "head_classes": weights.head_classes}
        record = {"command": shlex.join(["python", *sys.argv]), "start": started, **record}
    log(f"teacher: {what} {job.model.backbone} for {recipe.epochs} epoch(s) (config {job.teacher_key()}); "
        f"it is cached in {dest.parent} for the next runs")
    t0 = time.time()
    run_name = f"teacher-{job.teacher_key()}"
    kill_when("teacher-epoch", lambda: bool(glob.glob(os.path.join(storage, run_name, "checkpoint_*"))))
    out = fit(job, mode="teacher", teacher=start, workers=workers, storage_path=storage, run_name=run_name)
    if out.status != "ok" or out.model_path is None:
        raise RuntimeError(f"teacher training failed: {out.failure or out.status}")
    import torch
    state = torch.load(out.model_path, map_location="cpu", weights_only=True)
    metrics = {k: out.metrics[k] for k in ("val_top1", "test_top1", "epoch", "resumed_from_epoch") if k in out.metrics}
    if metrics.get("resumed_from_epoch"):
        log(f"teacher: went on from its epoch-{metrics['resumed_from_epoch']} checkpoint")
    return teachers.save(job, state, metrics, dest, train_s=round(time.time() - t0, 1), **record)
