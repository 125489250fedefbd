"""Distillation on real Ray Train (V2) with real Fashion-MNIST: tiny smoke jobs on a private 2-CPU Ray.

Each `fit` costs ~13-15 s here (worker start-up dominates), so the module trains one teacher and
reuses it: teacher (1 fit) + resume (2 fits) + non-finite (1 fit).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from sit_core import teachers
from sit_core.config import override
from sit_core.data import load_splits
from sit_core.files import file_sha256
from sweeps import runner
from sweeps.runner import Outcome, Workers, ensure_teacher, fit

from conftest import tiny_job

ONE = Workers(num_workers=1, use_gpu=False, cpus_per_worker=1.0)
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def teacher(ray_local, cache_dir, storage):
    """One teacher trained for the whole module (cache miss), reused by every distillation."""
    return ensure_teacher(tiny_job(), workers=ONE, storage=storage, **QUIET)


def test_teacher_is_trained_once_then_served_from_the_cache(teacher, cache_dir, storage, monkeypatch):
    assert teacher.source == "trained"
    assert teacher.path.is_file() and teacher.path.with_suffix(".json").is_file()
    assert teacher.path.parent == Path(cache_dir, "teachers")
    record = json.loads(teacher.path.with_suffix(".json").read_text())
    assert record["sha256"] == file_sha256(teacher.path) and record["teacher_key"] == tiny_job().teacher_key()
    assert teacher.metrics["epoch"] == 1 and set(teacher.metrics) >= {"val_top1", "test_top1"}
    job = tiny_job()
    teachers.load_state(job, teacher.path)  # a loadable state dict of the job's backbone

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(runner, "fit", no_training)
    second = ensure_teacher(job, workers=ONE, storage=storage, **QUIET)
    assert second.source == "cache" and second.path == teacher.path and second.metrics == teacher.metrics
    # A different student schedule, distillation recipe or validation subset shares the teacher ...
    other = override(job, {"train.lr": 3e-3, "model.schedule": "1@0.5", "data.val_subset": 32})
    assert ensure_teacher(other, workers=ONE, storage=storage, **QUIET).path == teacher.path

    # ... but a different teacher recipe is another cache entry: it trains (here: a stand-in fit).
    calls = []

    def fake_fit(job, **kwargs):
        calls.append(kwargs)
        return Outcome(status="ok", metrics={"epoch": 1, "val_top1": 1.0}, model_path=str(teacher.path))

    monkeypatch.setattr(runner, "fit", fake_fit)
    changed = override(job, {"teacher_train.lr": job.teacher_train.lr / 2})
    third = ensure_teacher(changed, workers=ONE, storage=storage, **QUIET)
    assert len(calls) == 1 and calls[0]["mode"] == "teacher"
    assert third.source == "trained" and third.path != teacher.path and third.path.is_file()
    assert changed.teacher_key() in third.path.name and changed.teacher_key() != job.teacher_key()


def test_a_changed_cached_teacher_is_refused(teacher, storage, tmp_path, monkeypatch):
    job = tiny_job()
    copy = tmp_path / "teachers" / teacher.path.name
    copy.parent.mkdir()
    copy.write_bytes(teacher.path.read_bytes()[:-16] + b"\0" * 16)  # same size, other bytes
    copy.with_suffix(".json").write_text(teacher.path.with_suffix(".json").read_text())
    monkeypatch.setenv("SIT_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="do not match the sha256"):
        ensure_teacher(job, workers=ONE, storage=storage, **QUIET)


@pytest.fixture(scope="module")
def first_run(teacher, storage):
    """One distillation epoch, run name "r"; the resume test continues it."""
    return fit(tiny_job(epochs=1), mode="distill", teacher=str(teacher.path), workers=ONE, storage_path=storage,
               run_name="r", max_failures=0)


def test_distillation_reports_metrics_and_a_checkpoint(first_run):
    assert first_run.status == "ok", first_run.failure
    m = first_run.metrics
    assert m["epoch"] == 1 and m["resumed_from_epoch"] == 0
    for k in ("train_loss", "train_loss_cls", "train_loss_token", "train_loss_logits"):
        assert m[k] == m[k] and m[k] >= 0.0, k  # finite, not NaN
    assert m["train_loss_token"] > 0.0  # FRD really compares tokens with the teacher's
    assert len(m["worker_nodes"]) == 1 and len(m["weight_checksums"]) == 1
    assert [h["epoch"] for h in first_run.history] == [1]


def test_checkpoints_hold_no_frozen_teacher_and_only_the_newest_two(teacher, storage):
    out = fit(tiny_job(epochs=3), mode="distill", teacher=str(teacher.path), workers=ONE, storage_path=storage,
              run_name="three", max_failures=0)
    assert out.status == "ok", out.failure
    kept = sorted(p.name for p in Path(storage, "three").glob("epoch_*"))
    assert kept == ["epoch_0002", "epoch_0003"]
    state = torch.load(Path(storage, "three", "epoch_0003", "state.pt"), map_location="cpu", weights_only=False)
    assert not [k for k in state["model"] if k.startswith("teacher.")]
    assert any(k.startswith("rtsm.") for k in state["model"]) and state["step"] == 3 * tiny_job().train.max_steps_per_epoch


def test_saved_weights_are_the_inference_student_without_rtsm(first_run):
    job = tiny_job()
    state = torch.load(first_run.model_path, map_location="cpu", weights_only=True)
    assert not [k for k in state if "rtsm" in k.lower() or k.startswith("teacher.")]
    model = job.model.build()
    model.load_state_dict(state, strict=True)  # exactly the student: nothing missing, nothing extra
    # They are the final weights: the test accuracy recomputed here is the one the run reported.
    test = load_splits(job.data).test
    model.eval()
    with torch.no_grad():
        x = torch.stack([test[i][0] for i in range(len(test))])
        y = torch.tensor([int(test[i][1]) for i in range(len(test))])
        top1 = 100.0 * float((model(x).argmax(-1) == y).float().mean())
    assert top1 == pytest.approx(first_run.metrics["test_top1"], abs=1e-6)


def test_rerun_with_the_same_name_resumes_from_the_last_epoch(first_run, teacher, storage):
    assert first_run.status == "ok"
    out = fit(tiny_job(epochs=2), mode="distill", teacher=str(teacher.path), workers=ONE, storage_path=storage,
              run_name="r", max_failures=0)
    assert out.status == "ok", out.failure
    assert out.metrics["resumed_from_epoch"] == 1 and out.metrics["epoch"] == 2
    # The history continues the first run's: epoch 1 from run one, epoch 2 (only) from the rerun.
    assert [(h["epoch"], h["resumed_from_epoch"]) for h in out.history] == [(1, 0), (2, 1)]
    assert out.metrics["weight_checksums"] != first_run.metrics["weight_checksums"]  # epoch 2 trained


def test_non_finite_loss_stops_promptly_without_retrying(teacher, storage, ray_local):
    job = tiny_job()
    state = teachers.load_state(job, teacher.path)
    broken = {k: torch.full_like(v, float("nan")) if k == "head.weight" else v for k, v in state.items()}
    t0 = time.perf_counter()
    out = fit(job, mode="distill", teacher=ray_local.put(broken), workers=ONE, storage_path=storage,
              run_name="nan", max_failures=2)
    assert time.perf_counter() - t0 < 240  # one fit's worth (even on a busy machine), not retries
    assert out.status == "non_finite"
    assert "non-finite" in out.failure and "step 1" in out.failure
    assert out.metrics["epoch"] == 1 and out.metrics["resumed_from_epoch"] == 0
    assert [h["epoch"] for h in out.history] == [1]  # one report, then a clean stop: no retry
