"""Ray-side plumbing shared by `distill.py` and `pareto.py`: start/join Ray, get a teacher,
run one distillation on a `TorchTrainer`, read its outcome back."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import ray
import ray.train
import torch
from ray.train.torch import TorchConfig, TorchTrainer

from sit_core.config import DistillJob

from .train_loop import MODEL_FILE, train_func

DEFAULT_CACHE = os.environ.get("SIT_CACHE_DIR", str(Path.home() / ".cache" / "sit-pareto"))


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> str:
    """Join the running cluster (`address`, RAY_ADDRESS, or one started on this node), else start Ray here."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return "using the Ray instance already initialised in this process"
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None and _local_cluster_running():
        address = "auto"
    runtime_env = {"worker_process_setup_hook": "sweeps.runner.quiet_worker_logs"}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return f"joined Ray cluster at {address} ({_cluster_summary()})"
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env)
    return f"started a local Ray instance ({_cluster_summary()})"


def quiet_worker_logs() -> None:
    """Runs in every Ray worker process. Without the dashboard (1 GB we do not spend on a laptop)
    Ray Train's placement-group cleaner warns every few seconds that the state API is unavailable."""
    import logging
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _local_cluster_running() -> bool:
    # `ray start` on this node leaves its address here; without it there is nothing to join.
    return Path(tempfile.gettempdir(), "ray", "ray_current_cluster").exists()


def _cluster_summary() -> str:
    res = ray.cluster_resources()
    return f"{len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


@dataclass
class Workers:
    """How one distillation is spread: Ray Train workers, each one DDP replica."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0

    def scaling(self) -> ray.train.ScalingConfig:
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = 1
        return ray.train.ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                                       resources_per_worker=resources)

    def torch_config(self) -> TorchConfig:
        return TorchConfig(backend="nccl" if self.use_gpu else "gloo")


@dataclass
class Outcome:
    """What one distillation produced."""

    status: str                       # ok | non_finite
    metrics: dict                     # last epoch's metrics (rank 0)
    history: list = field(default_factory=list)  # every epoch's metrics
    model_path: Optional[str] = None  # inference weights (no RTSM) of the last epoch
    failure: Optional[str] = None
    run_path: Optional[str] = None


def fit(job: DistillJob, *, mode: str, teacher=None, workers: Workers, storage_path: str, run_name: str,
        max_failures: int = 2, callbacks: tuple = (), probe_lock: bool = True) -> Outcome:
    """Run `train_func` on a TorchTrainer; a rerun with the same name/storage resumes its checkpoints."""
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"job": job.to_dict(), "mode": mode, "teacher": teacher, "probe_lock": probe_lock},
        torch_config=workers.torch_config(),
        scaling_config=workers.scaling(),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=os.path.abspath(storage_path), callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        return Outcome(status="error", metrics={}, failure=_first_line_of_cause(e))
    history = [m for _, m in (result.best_checkpoints or [])]
    history.sort(key=lambda m: m.get("epoch", 0))
    metrics = dict(result.metrics or (history[-1] if history else {}))
    model_path = None
    if result.checkpoint is not None:
        local = Path(storage_path, run_name, "final_model.pt")
        with result.checkpoint.as_directory() as d:
            shutil.copyfile(Path(d, MODEL_FILE), local)
        model_path = str(local)
    status = metrics.get("status", "ok" if metrics else "empty")
    return Outcome(status=status, metrics=metrics, history=history, model_path=model_path,
                   failure=metrics.get("failure"), run_path=str(result.path))


def _first_line_of_cause(error: Exception) -> str:
    """The worker's own exception line out of Ray's wrapped traceback."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    causes = [ln for ln in lines if not ln.startswith(("File ", "Traceback", "^", "[Rank")) and ":" in ln]
    return causes[-1] if causes else (lines[0] if lines else type(error).__name__)


@dataclass
class Teacher:
    path: str
    metrics: dict
    cached: bool


def ensure_teacher(job: DistillJob, *, cache_dir: str = DEFAULT_CACHE, workers: Workers, storage_path: str,
                   log=print) -> Teacher:
    """The teacher's weights file: the job's local checkpoint, a cached one, or a freshly trained one."""
    if job.teacher_checkpoint:
        path = Path(job.teacher_checkpoint).expanduser()
        load_teacher_state(job, str(path))  # fail now, before any worker starts
        return Teacher(str(path), {}, cached=True)
    key = job.teacher_key()
    path = Path(cache_dir, "teachers", f"{job.model.backbone}-{key}.pt")
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        log(f"teacher: reusing {path} (cache key {key})")
        metrics = {k: v for k, v in json.loads(meta.read_text()).items() if k != "job"}  # same as on a miss
        return Teacher(str(path), metrics, cached=True)
    log(f"teacher: training {job.model.backbone} for {job.teacher_train.epochs} epoch(s), cache key {key}")
    out = fit(job, mode="teacher", workers=workers, storage_path=storage_path, run_name=f"teacher-{key}",
              probe_lock=False)
    if out.status != "ok" or out.model_path is None:
        raise RuntimeError(f"teacher training failed: {out.failure or out.status}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    shutil.copyfile(out.model_path, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written teacher in the cache
    metrics = {k: out.metrics[k] for k in ("val_top1", "test_top1", "epoch") if k in out.metrics}
    meta.write_text(json.dumps({**metrics, "job": job.to_dict()}, indent=1))
    return Teacher(str(path), metrics, cached=False)


def load_teacher_state(job: DistillJob, path: str) -> dict:
    """Teacher weights from a local file, checked against the job's backbone (clear error if not)."""
    if not os.path.isfile(path):
        raise ValueError(f"teacher checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file is a user error here)
        raise ValueError(f"teacher checkpoint {path} is not a readable torch file: {_first_line(e)}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    model = job.model.build_teacher()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:  # shape mismatches raise even with strict=False
        raise ValueError(f"teacher checkpoint {path} does not fit {job.model.backbone} "
                         f"{job.model.kwargs}: {_first_line(e)}") from None
    if missing or unexpected:
        raise ValueError(f"teacher checkpoint {path} does not fit {job.model.backbone} "
                         f"{job.model.kwargs}: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
    return state


def _first_line(error: Exception, limit: int = 300) -> str:
    """One line of an exception's text (torch's are multi-line essays)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
