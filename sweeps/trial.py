"""One sweep trial (a Ray Tune function trainable): the sampled candidate's latency first (predicted
by the sweep's latency model, or probed end to end on the serving node: `speed_probe`), then its
distillation, reporting every epoch to Tune (objectives, constraints, a checkpoint).

A one-worker trial trains inside this trial process with `sit_core.train` (no worker group to
start: seconds saved per trial); multi-worker and multi-node trials run a `TorchTrainer`. MLflow is
written by the driver's `TrialRunLogger` from these reports, so a trial stopped early or killed
still ends with the right status.
"""
from __future__ import annotations

import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from search_spaces import apply_point
from sit_core.config import DistillJob
from sit_core.data import eval_loader, load_splits, train_loader
from sit_core.train import EVAL_BATCH, Trainer, distill_task, run_epochs, steps_per_epoch

from .node_lock import NodeLock
from .pareto_front import Constraints
from .runner import Workers, fit
from .train_loop import MODEL_FILE, STATE_FILE

TRIAL_CPU = 0.1  # the trial process itself when workers train (fractional: see runner.size_workers)


class TrialFailed(RuntimeError):
    """The candidate could not be trained (error or non-finite loss); Tune records the trial as failed."""


@dataclass
class SweepContext:
    """What every trial of one sweep shares (pickled into each trial by `tune.with_parameters`)."""

    base_job: DistillJob
    workers: Workers
    storage: str                            # TorchTrainer runs of multi-worker trials
    constraints: Constraints
    latency: Callable                       # ModelSpec -> {"latency_ms", "gmacs", "params_m", ...} (speed_probe)
    teacher: list                           # [ObjectRef of the teacher's state_dict] (a list: not resolved by Tune)
    probe_lock: bool = False                # training steps yield the node to probes (--latency measure only)

    @property
    def in_process(self) -> bool:
        return self.workers.num_workers == 1


class TrialReport:
    """Adds what every report of a trial must carry to an epoch's metrics: the objectives, the
    constraints, the latency (known before training) and the time spent working. Picklable: the
    Train workers of a multi-worker trial apply it too, before `ray.train.report`."""

    def __init__(self, latency: dict, constraints: Constraints, schedule: str, full_epochs: int,
                 started: Optional[float] = None):
        self.latency, self.constraints = latency, constraints
        self.static = {**latency, "schedule": schedule, "full_epochs": full_epochs,
                       "trial_node": ray.get_runtime_context().get_node_id()}
        # `trial_wall_s` from when the trial function started (latency included, like `work_s`)
        self.t_start, self.work_s = started or time.time(), float(latency.get("latency_s", 0.0))

    def __call__(self, metrics: dict) -> dict:
        top1, latency_ms = metrics.get("val_top1", float("nan")), self.latency["latency_ms"]
        self.work_s += metrics.get("train_s", 0.0) + metrics.get("eval_s", 0.0)
        report = {**metrics, **self.static, "top1": top1, "feasible": self.constraints.feasible(top1, latency_ms),
                  "work_s": self.work_s, "trial_wall_s": time.time() - self.t_start,
                  "reported_at": time.time()}  # the MLflow timestamp of this report (trial_logger.REPORTED_AT)
        if self.constraints.max_latency_ms is not None or self.constraints.min_top1 is not None:
            # only a sweep with constraints tells them: zeros would cost GPSampler two needless models
            report["constraint_violation"] = list(self.constraints.violation(top1, latency_ms))
        return report


def run_trial(config: dict, ctx: SweepContext) -> None:
    started = time.time()
    job = apply_point(ctx.base_job, config)
    t0 = time.perf_counter()
    latency = {**ctx.latency(job.model), "latency_s": time.perf_counter() - t0}
    extend = TrialReport(latency, ctx.constraints, str(job.model.schedule), job.train.epochs, started=started)
    if ctx.in_process:
        final = _train_here(job, ctx, extend)
    else:
        outcome = fit(job, mode="distill", teacher=ctx.teacher[0], workers=ctx.workers, storage_path=ctx.storage,
                      run_name=f"trial-{tune.get_context().get_trial_id()}", max_failures=1,
                      callbacks=(TuneReportCallback(),), extend_report=extend, probe_lock=ctx.probe_lock)
        final = outcome.metrics
        if outcome.status == "error":
            raise TrialFailed(f"{job.model.schedule}: {outcome.failure}")
    if final.get("status") != "ok":
        raise TrialFailed(f"{job.model.schedule}: {final.get('failure') or final.get('status')}")


def _train_here(job: DistillJob, ctx: SweepContext, extend: TrialReport) -> dict:
    """Distil in this process, one report (and checkpoint) per epoch; resumes from Tune's checkpoint."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))
    # a reserved GPU the process cannot see (a scheduling test's accounted-only GPUs) trains on CPU
    device = torch.device("cuda" if ctx.workers.use_gpu and torch.cuda.is_available() else "cpu")
    torch.manual_seed(job.train.seed)
    splits = load_splits(job.data)
    pin = device.type == "cuda"
    loader = train_loader(splits.train, job.train.batch_size, cpus=cpus, pin_memory=pin)
    val = eval_loader(splits.val, EVAL_BATCH, cpus=cpus, pin_memory=pin, persistent=True)
    test = eval_loader(splits.test, EVAL_BATCH, cpus=cpus, pin_memory=pin)
    task = distill_task(job, ray.get(ctx.teacher[0]), splits.train)
    trainer = Trainer(task, job.train, steps_per_epoch=steps_per_epoch(job.train, len(loader)), device=device)
    start_epoch, last = _restore(tune.get_checkpoint(), trainer)
    if start_epoch >= job.train.epochs or last.get("status", "ok") != "ok":
        # Restored from the checkpoint of its last report (a reclaimed node, or a driver killed before
        # Tune saw the trial end): nothing left to train, tell Tune that report again so the trial
        # ends with it (searcher and scheduler see its final values).
        if not last:  # a checkpoint written before reports were kept in it: Tune's last result stands
            return {"status": "ok", "resumed_from_epoch": start_epoch}
        last = {**last, "resumed_from_epoch": start_epoch}
        tune.report(last)
        return last

    def report(metrics: dict, is_last: bool) -> None:
        nonlocal last
        last = extend({**metrics, "resumed_from_epoch": start_epoch})
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({**trainer.state_dict(), "epoch": metrics["epoch"], "report": last}, os.path.join(tmp, STATE_FILE))
            torch.save(task.inference_model.state_dict(), os.path.join(tmp, MODEL_FILE))
            tune.report(last, checkpoint=tune.Checkpoint.from_directory(tmp))

    guard = NodeLock().shared if ctx.probe_lock else nullcontext
    run_epochs(trainer, loader, val, test, start_epoch=start_epoch, report=report, guard=guard)
    return last


def _restore(checkpoint: Optional[tune.Checkpoint], trainer: Trainer) -> tuple[int, dict]:
    """(epochs already trained, the report that checkpoint was made with) -- (0, {}) for a new trial."""
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
    trainer.load_state_dict(state)
    return int(state["epoch"]), dict(state.get("report") or {})
