"""Teachers the project trained: shipped with the package or cached, found by their config hash.

A teacher is a weights file plus a JSON record beside it: the command that produced it, its
`DistillJob.teacher_key()` (architecture + data + recipe), the data, its measured accuracy and the
weights' sha256. Lookup checks the hash before anything reads the weights, and refuses a mismatch.

    sit_core/weights/fmnist-cpu-teacher.pt    shipped: the default sweep never trains its teacher
    ~/.cache/sit-pareto/teachers/<backbone>-<key>.pt   trained (or fine-tuned) here once, then reused

A user's teacher is a local checkpoint (`load_state`: a state dict, a timm/PyTorch checkpoint or a
teacher card) or timm's pretrained weights; `start_weights` fits either to the job's backbone, with
a fresh classifier when its class count differs, which `--finetune-teacher` then trains (the key of a
fine-tuned teacher includes the sha256 of the weights it started from).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from .config import DistillJob
from .files import atomic_write, atomic_write_text, cache_dir, file_sha256

SHIPPED_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class TeacherRecord:
    path: Optional[Path]        # the weights (a plain state_dict or a teacher card); None: timm's download
    key: str                    # DistillJob.teacher_key() it was trained for
    metrics: dict               # val_top1, test_top1 as measured when it was trained
    source: str                 # shipped | cache | checkpoint | pretrained | trained
    info: dict                  # the whole JSON record


def teacher_state(job: DistillJob, record: TeacherRecord) -> dict:
    """The weights a run distils from: the record's file, or timm's pretrained weights as they are."""
    if record.source == "pretrained":
        return ready_weights(job)
    return load_state(job, record.path)


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
    """A teacher's state_dict from a local file (a plain state dict, a timm/PyTorch checkpoint with its
    usual wrappers, or a teacher card), checked to fit the job's backbone: ValueError with one line if
    not. A classifier for another class count is refused with the fix (fine-tune a new head first)."""
    return _fit(job, _read_state(path), f"teacher checkpoint {path}", fresh_head_ok=False).state


@dataclass(frozen=True)
class StartWeights:
    """The weights a job's teacher starts from, fitted to `job.model` (strict load)."""

    state: dict
    head_trained: bool          # False: the classifier is a fresh (seeded) one, for another class count
    head_classes: Optional[int]  # the class count the weights' own classifier was trained for, if known
    source: str                 # what they are, for logs and the teacher's record


def start_weights(job: DistillJob) -> StartWeights:
    """The job's checkpoint, card or timm pretrained weights, fitted to its backbone. Only the
    classifier may differ (another class count): it is then replaced by a fresh one, seeded by
    `teacher_train.seed`, for `--finetune-teacher` to train. ValueError (one line) for anything else."""
    if job.teacher_checkpoint:
        return _fit(job, _read_state(job.teacher_checkpoint), f"teacher checkpoint {job.teacher_checkpoint}",
                    fresh_head_ok=True)
    if job.teacher_pretrained:
        return _pretrained(job)
    raise ValueError("the job names no teacher weights (teacher_checkpoint or teacher_pretrained)")


def ready_weights(job: DistillJob) -> dict:
    """The teacher as it is (no fine-tuning): start weights whose classifier was trained for the job's classes."""
    start = start_weights(job)
    if not start.head_trained:
        raise ValueError(_head_message(start.source, start.head_classes, _num_classes(job)))
    return start.state


def _head_message(source: str, head: Optional[int], classes: int) -> str:
    has = f"has a {head}-class head" if head else "has no classifier for these classes"
    return (f"{source} {has} but the job's model has {classes} classes: train a new head on the data first "
            f"with --finetune-teacher EPOCHS (add --finetune-backbone to fine-tune all of it)")


def _num_classes(job: DistillJob) -> int:
    return int(job.model.kwargs.get("num_classes", job.model.pretrained_cfg().get("num_classes", 1000)))


def _seeded_teacher(job: DistillJob, **extra):
    """The backbone with its fresh parts (a new classifier) initialised from `teacher_train.seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.teacher_train.seed)
        return job.model.build_teacher(**extra)


def _classifier(model) -> tuple[str, ...]:
    """The classifier module names (timm's pretrained_cfg 'classifier': 'head', or 'head', 'head_dist')."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    return (names,) if isinstance(names, str) else tuple(names)


def _fit(job: DistillJob, state: dict, source: str, fresh_head_ok: bool) -> StartWeights:
    """`state` loaded into the job's backbone; a classifier of another shape is left out (a fresh one
    stays) if `fresh_head_ok`, else refused with the fix. Any other mismatch: 'does not fit'."""
    model = _seeded_teacher(job)
    own = model.state_dict()
    heads = _classifier(model)

    def is_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in heads)

    other_head = [k for k, v in state.items() if is_head(k) and k in own and tuple(v.shape) != tuple(own[k].shape)]
    head_classes = next((int(state[k].shape[0]) for k in sorted(state) if is_head(k) and k.endswith("weight")
                         and getattr(state[k], "ndim", 0) >= 1), None)
    if other_head:  # the body must fit first: another architecture is not a head problem
        state = {k: v for k, v in state.items() if not is_head(k)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:  # shape mismatches raise even with strict=False
        raise ValueError(f"{source} does not fit {job.model.backbone} {job.model.kwargs}: {_first_line(e)}") from None
    missing_head = [k for k in missing if is_head(k)]
    missing = [k for k in missing if not ((fresh_head_ok or other_head) and is_head(k))]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit {job.model.backbone} {job.model.kwargs}: "
                         f"missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
    if other_head and not fresh_head_ok:
        raise ValueError(_head_message(source, head_classes, model.num_classes))
    return StartWeights(model.state_dict(), not other_head and not missing_head, head_classes, source)


def _read_state(path: str | Path) -> dict:
    """The raw state dict in a weights file or a teacher card (wrappers and DDP prefixes removed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"teacher checkpoint {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        return _card_state(path)
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
    return {k.removeprefix("module."): v for k, v in state.items()}  # saved from a DDP wrapper


def card_teacher(path: str | Path) -> DistillJob:
    """The job of a teacher card: a card of a plain backbone (a student card holds a slimmed model)."""
    from .card import card_job
    try:
        job = card_job(path)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ValueError(f"teacher card {path}: {_first_line(e)}") from None
    if not job.model.schedule.is_identity:
        raise ValueError(f"teacher card {path} holds a slimmed model ({job.model.schedule}): a teacher card holds "
                         "the plain backbone (write_card of the teacher, schedule none)")
    return job


def _card_state(path: Path) -> dict:
    from .card import load_card
    card_teacher(path)
    try:
        return load_card(path).state_dict()  # its sha256 is checked before the weights are read
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"teacher card {path}: {_first_line(e)}") from None


def _pretrained(job: DistillJob) -> StartWeights:
    """timm's pretrained weights for the backbone's tag, through timm's own loader (it resizes the
    position embedding to img_size, and drops a classifier trained for another class count):
    downloaded, or from a local copy (`pretrained_cfg_overlay=dict(file=...)`)."""
    where = job.teacher_pretrained
    overlay = {} if where == "timm" else {"pretrained_cfg_overlay": dict(file=os.path.abspath(os.path.expanduser(where)))}
    source = f"timm's pretrained {job.model.backbone}" + ("" if where == "timm" else f" (local file {where})")
    if where != "timm" and not os.path.isfile(os.path.expanduser(where)):
        raise ValueError(f"pretrained weights file {where} does not exist")
    try:
        model = _seeded_teacher(job, pretrained=True, **overlay)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001  (no network, no weights for the tag, a file that does not fit)
        hint = "" if overlay else " (offline? give a local copy: --pretrained FILE, or --teacher-checkpoint FILE)"
        raise ValueError(f"could not load {source}: {_first_line(e)}{hint}") from None
    head_classes = (model.pretrained_cfg or {}).get("num_classes")
    # timm drops the classifier (keeps the fresh one) when the class counts differ
    trained = head_classes is not None and int(head_classes) == model.num_classes
    return StartWeights(model.state_dict(), trained, head_classes, source)


def _first_line(error: Exception, limit: int = 300) -> str:
    """One line of an exception's text (torch's are multi-line essays)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
