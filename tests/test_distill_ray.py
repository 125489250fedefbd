"""Distillation on real Ray Train (V2) with real Fashion-MNIST: tiny smoke jobs on a private 2-CPU Ray.

Each `fit` costs ~13-15 s here (worker startup dominates), so the module trains one teacher and
reuses it: teacher (1 fit) + resume (2 fits) + non-finite (1 fit).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from sit_core import FRDDistiller, FRDLoss, student_from_teacher
from sit_core.config import LossWeights
from sit_core.data import load_splits
from sit_core.schedule import SlimSchedule
from sweeps import runner
from sweeps.runner import Outcome, Workers, ensure_teacher, fit, load_teacher_state

from conftest import tiny_job

ONE = Workers(num_workers=1, use_gpu=False, cpus_per_worker=1.0)


# --------------------------------------------------------------------------------------------
# Pure torch, no Ray.
def test_one_distillation_step_lowers_the_frd_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    job = tiny_job()
    teacher = job.model.build_teacher()
    student, _ = student_from_teacher(job.model.build(), teacher)
    net = FRDDistiller(student, teacher)
    criterion = FRDLoss(job.loss.lambda_token, job.loss.lambda_logits, job.loss.tau)
    opt = torch.optim.AdamW(net.param_groups(1e-3, 0.05, 5.0), lr=1e-3)
    x = torch.randn(16, 1, 32, 32)
    y = torch.randint(0, 10, (16,))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}

    net.train()
    torch.manual_seed(1)  # same dropout / drop-path draws (none in this model, but be exact)
    before, _ = criterion(*net(x), y)
    opt.zero_grad()
    before.backward()
    opt.step()
    torch.manual_seed(1)
    with torch.no_grad():
        after, _ = criterion(*net(x), y)

    assert torch.isfinite(before) and torch.isfinite(after)
    assert after.item() < before.item(), (before.item(), after.item())
    for k, v in teacher.state_dict().items():  # the teacher is frozen
        assert torch.equal(v, teacher_before[k]), k


# --------------------------------------------------------------------------------------------
# Real Ray.
@pytest.fixture(scope="module")
def teacher(ray_local, cache_dir, storage):
    """One teacher trained for the whole module (cache miss), reused by every distillation."""
    t0 = time.perf_counter()
    got = ensure_teacher(tiny_job(), cache_dir=cache_dir, workers=ONE, storage_path=storage, log=lambda *_: None)
    return got, time.perf_counter() - t0


def test_teacher_is_trained_once_then_served_from_the_cache(teacher, cache_dir, storage, monkeypatch):
    first, _ = teacher
    assert first.cached is False
    path = Path(first.path)
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert path.parent == Path(cache_dir, "teachers")
    assert first.metrics["epoch"] == 1 and 0.0 <= first.metrics["val_top1"] <= 100.0
    job = tiny_job()
    load_teacher_state(job, first.path)  # a loadable state dict of the job's backbone

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(runner, "fit", no_training)
    t0 = time.perf_counter()
    second = ensure_teacher(job, cache_dir=cache_dir, workers=ONE, storage_path=storage, log=lambda *_: None)
    assert time.perf_counter() - t0 < 10.0  # a file read, not a Ray job
    assert second.cached is True and second.path == first.path
    assert second.metrics == first.metrics
    # A different student schedule or distillation recipe shares the teacher ...
    other_student = tiny_job(lr=3e-3)
    other_student.model.schedule = SlimSchedule((1,), 0.5)
    assert ensure_teacher(other_student, cache_dir=cache_dir, workers=ONE, storage_path=storage,
                          log=lambda *_: None).path == first.path

    # ... but a different teacher recipe is another cache entry: it trains (here: a stand-in fit).
    calls = []

    def fake_fit(job, **kwargs):
        calls.append(kwargs)
        return Outcome(status="ok", metrics={"epoch": 1, "val_top1": 1.0}, model_path=first.path)

    monkeypatch.setattr(runner, "fit", fake_fit)
    changed = tiny_job()
    changed.teacher_train = dataclasses.replace(changed.teacher_train, lr=changed.teacher_train.lr / 2)
    third = ensure_teacher(changed, cache_dir=cache_dir, workers=ONE, storage_path=storage, log=lambda *_: None)
    assert len(calls) == 1 and calls[0]["mode"] == "teacher"
    assert third.cached is False and third.path != first.path and Path(third.path).is_file()
    assert changed.teacher_key() in third.path and changed.teacher_key() != job.teacher_key()


@pytest.fixture(scope="module")
def first_run(teacher, storage):
    """One distillation epoch, run name "r"; the resume test continues it."""
    t0 = time.perf_counter()
    out = fit(tiny_job(epochs=1), mode="distill", teacher=teacher[0].path, workers=ONE, storage_path=storage,
              run_name="r", max_failures=0)
    return out, time.perf_counter() - t0


def test_distillation_reports_metrics_and_a_checkpoint(first_run):
    out, _ = first_run
    assert out.status == "ok", out.failure
    m = out.metrics
    assert m["mode"] == "distill" and m["epoch"] == 1 and m["resumed_from_epoch"] == 0
    for k in ("train_loss", "train_loss_cls", "train_loss_token", "train_loss_logits"):
        assert m[k] == m[k] and m[k] >= 0.0, k  # finite, not NaN
    assert m["train_loss_token"] > 0.0  # FRD really compares tokens with the teacher's
    assert 0.0 <= m["val_top1"] <= 100.0 and 0.0 <= m["test_top1"] <= 100.0
    assert len(m["worker_nodes"]) == 1 and len(m["weight_checksums"]) == 1
    assert [h["epoch"] for h in out.history] == [1]


def test_saved_weights_are_the_inference_student_without_rtsm(first_run):
    out, _ = first_run
    job = tiny_job()
    state = torch.load(out.model_path, map_location="cpu", weights_only=True)
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
    assert top1 == pytest.approx(out.metrics["test_top1"], abs=1e-6)


def test_rerun_with_the_same_name_resumes_from_the_last_epoch(first_run, teacher, storage):
    first, _ = first_run
    assert first.status == "ok"
    out = fit(tiny_job(epochs=2), mode="distill", teacher=teacher[0].path, workers=ONE, storage_path=storage,
              run_name="r", max_failures=0)
    assert out.status == "ok", out.failure
    assert out.metrics["resumed_from_epoch"] == 1
    assert out.metrics["epoch"] == 2
    # The history continues the first run's: epoch 1 from run one, epoch 2 (only) from the rerun.
    assert [(h["epoch"], h["resumed_from_epoch"]) for h in out.history] == [(1, 0), (2, 1)]
    assert out.history[0]["weight_checksums"] == first.metrics["weight_checksums"]
    assert out.metrics["weight_checksums"] != first.metrics["weight_checksums"]  # epoch 2 trained


def test_non_finite_loss_stops_promptly_without_retrying(teacher, storage, ray_local):
    job = tiny_job()
    job.loss = LossWeights(lambda_token=float("inf"))
    t0 = time.perf_counter()
    out = fit(job, mode="distill", teacher=ray_local.put(load_teacher_state(job, teacher[0].path)),
              workers=ONE, storage_path=storage, run_name="nan", max_failures=2)
    assert time.perf_counter() - t0 < 240  # one fit's worth (even on a busy machine), not retries
    assert out.status == "non_finite"
    assert "non-finite" in out.failure and "step 1" in out.failure
    assert out.metrics["epoch"] == 1 and out.metrics["resumed_from_epoch"] == 0
    assert [h["epoch"] for h in out.history] == [1]  # one report, then a clean stop: no retry
