"""Teachers the project trained: shipped with the package or cached, found by their config hash.

A teacher is a weights file plus a JSON record beside it: the command that produced it, its
`DistillJob.teacher_key()` (architecture + data + recipe), the data, its measured accuracy and the
weights' sha256. Lookup checks the hash before anything reads the weights, and refuses a mismatch.

    sit_core/weights/fmnist-cpu-teacher.pt    shipped: the default sweep never trains its teacher
    ~/.cache/sit-pareto/teachers/<backbone>-<key>.pt   trained here once, then reused
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import DistillJob
from .files import atomic_write, atomic_write_text, cache_dir, file_sha256

SHIPPED_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class TeacherRecord:
    path: Path                  # the weights (a plain state_dict)
    key: str                    # DistillJob.teacher_key() it was trained for
    metrics: dict               # val_top1, test_top1 as measured when it was trained
    source: str                 # shipped | cache | checkpoint | trained
    info: dict                  # the whole JSON record


def _record_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def _read(weights: Path, source: str) -> Optional[TeacherRecord]:
    meta = _record_path(weights)
    if not (weights.is_file() and meta.is_file()):
        return None
    info = json.loads(meta.read_text())
    if file_sha256(weights) != info.get("sha256"):
        raise ValueError(f"teacher weights {weights} do not match the sha256 recorded in {meta.name}: the file was "
                         "changed or corrupted; delete both files to retrain, or restore the original")
    return TeacherRecord(weights, info["teacher_key"], dict(info.get("metrics", {})), source, info)


def find(job: DistillJob) -> Optional[TeacherRecord]:
    """The shipped or cached teacher trained for exactly this job's teacher config, hash-checked."""
    key = job.teacher_key()
    for weights in sorted(SHIPPED_DIR.glob("*.pt")):
        info = json.loads(_record_path(weights).read_text()) if _record_path(weights).is_file() else {}
        if info.get("teacher_key") == key:
            return _read(weights, "shipped")
    return _read(cached_path(job), "cache")


def cached_path(job: DistillJob) -> Path:
    return cache_dir("teachers") / f"{job.model.backbone}-{job.teacher_key()}.pt"


def save(job: DistillJob, state: dict, metrics: dict, dest: Path, **info) -> TeacherRecord:
    """Write weights, then their record (a kill between the two leaves no record: not found, retrained)."""
    atomic_write(dest, lambda f: torch.save(state, f))
    record = {"teacher_key": job.teacher_key(), "sha256": file_sha256(dest), "metrics": metrics,
              "backbone": job.model.backbone, "kwargs": job.model.kwargs, "data": job.to_dict()["data"],
              "recipe": job.to_dict()["teacher_train"], **info}
    atomic_write_text(_record_path(dest), json.dumps(record, indent=1) + "\n")
    return TeacherRecord(dest, record["teacher_key"], metrics, "trained", record)


def load_state(job: DistillJob, path: str | Path) -> dict:
    """A teacher's state_dict from a local file (a plain state dict or a timm/PyTorch checkpoint with
    its usual wrappers), checked to fit the job's backbone: ValueError with one line if not."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"teacher checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file is a user error here)
        raise ValueError(f"teacher checkpoint {path} is not a readable weights file: {_first_line(e)}") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm / DeiT / PyTorch wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"teacher checkpoint {path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from a DDP wrapper
    model = job.model.build_teacher()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:  # shape mismatches raise even with strict=False
        raise ValueError(f"teacher checkpoint {path} does not fit {job.model.backbone} {job.model.kwargs}: "
                         f"{_first_line(e)}") from None
    if missing or unexpected:
        raise ValueError(f"teacher checkpoint {path} does not fit {job.model.backbone} {job.model.kwargs}: "
                         f"missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
    return model.state_dict()


def _first_line(error: Exception, limit: int = 300) -> str:
    """One line of an exception's text (torch's are multi-line essays)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
