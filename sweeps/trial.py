"""One sweep trial (a Ray Tune function trainable): distil the sampled candidate on Ray Train,
measure its latency alone on the node, log it to MLflow, report the objectives to Tune/Optuna."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Optional

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from search_spaces import apply_point
from sit_core.config import DistillJob

from . import tracking
from .runner import Workers, fit
from .speed_probe import probe


class TrialFailed(RuntimeError):
    """The candidate could not be trained (error or non-finite loss); Tune records the trial as failed."""


@dataclass
class SweepContext:
    """What every trial of one sweep shares (pickled into each trial by `tune.with_parameters`)."""

    base_job: dict
    workers: Workers
    storage_path: str            # Ray Train runs of the trials (shared storage on a cluster)
    speed_cache: str             # probe results by architecture
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    max_latency_ms: Optional[float] = None
    min_top1: Optional[float] = None
    objectives: dict = field(default_factory=lambda: {"top1": "max", "latency_ms": "min"})


def run_trial(point: dict, ctx: SweepContext, teacher: list) -> None:
    trial_id = tune.get_context().get_trial_id()
    t0 = time.perf_counter()
    job = apply_point(DistillJob.from_dict(ctx.base_job), point)
    job.name = f"trial-{trial_id}"
    outcome = fit(job, mode="distill", teacher=teacher[0], workers=ctx.workers, storage_path=ctx.storage_path,
                  run_name=f"trial-{trial_id}", max_failures=1, callbacks=(TuneReportCallback(),))
    params = {"point": point, "schedule": str(job.model.schedule), "reducer": job.model.schedule.reducer}
    tags = {"sit.job": json.dumps(job.to_dict())}
    if outcome.status != "ok":
        tracking.log_trial(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, trial_id, params,
                           outcome.history, {}, status="FAILED", failure=outcome.failure, tags=tags)
        raise TrialFailed(f"{job.model.schedule}: {outcome.failure or outcome.status}")

    t_probe = time.perf_counter()
    speed = probe(job.model, job.speed, cache_dir=ctx.speed_cache)
    probe_s = time.perf_counter() - t_probe
    m = outcome.metrics
    work_s = sum(h.get("train_s", 0.0) + h.get("eval_s", 0.0) for h in outcome.history) + probe_s
    wall_s = time.perf_counter() - t0
    violation = [
        (speed["latency_ms"] - ctx.max_latency_ms) if ctx.max_latency_ms is not None else 0.0,
        (ctx.min_top1 - m["val_top1"]) if ctx.min_top1 is not None else 0.0,
    ]
    final = {
        "top1": m["val_top1"], "test_top1": m.get("test_top1"), "latency_ms": speed["latency_ms"],
        "latency_ms_std": speed["latency_ms_std"], "latency_ms_p90": speed["latency_ms_p90"],
        "img_s": speed["img_s"], "gmacs": speed["gmacs"], "params_m": speed["params_m"],
        "speedup": speed["speedup"], "flops_speedup": speed["flops_speedup"],
        "teacher_latency_ms": speed["teacher_latency_ms"], "worker_nodes": m.get("worker_nodes", []),
        "speed_cached": float(speed["cached"]), "feasible": all(v <= 0 for v in violation),
        "constraint_violation": violation, "wall_s": wall_s, "work_s": work_s, "probe_s": probe_s,
        "overhead_s": max(0.0, wall_s - work_s), "overhead_share": max(0.0, wall_s - work_s) / wall_s,
        "status": "ok",
    }
    tags.update({"sit.weights": outcome.model_path or "", "sit.speed": json.dumps(speed["speed"]),
                 "sit.feasible": str(final["feasible"]).lower(), "sit.worker_nodes": ",".join(final["worker_nodes"])})
    run_id = tracking.log_trial(
        ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, trial_id, params, outcome.history,
        {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        speed_record=speed["speed"], status="FINISHED", tags=tags)
    tune.report({**final, "mlflow_run_id": run_id, "model_path": outcome.model_path,
                 "schedule": str(job.model.schedule)})
