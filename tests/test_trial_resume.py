"""A one-worker sweep trial (`sweeps.trial._train_here`) restored from its own checkpoints, with
Tune's session stood in by a recorder of `tune.report` calls: from the last epoch's checkpoint (the
driver was killed before Tune saw the trial end) it trains nothing and reports that last result
again, so the trial ends as it did (not as a failed trial); from an earlier one it trains the rest."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import ray.cloudpickle
import torch
from ray import tune

from sweeps import trial as trial_module
from sweeps.pareto_front import Constraints
from sweeps.runner import Workers
from sweeps.trial import SweepContext, TrialReport, _train_here

from conftest import tiny_job

pytestmark = pytest.mark.slow


class FakeSession:
    """What `_train_here` uses of `ray.tune`: the checkpoint to start from, and `report`."""

    Checkpoint = tune.Checkpoint

    def __init__(self, start_from, keep_dir: Path):
        self.start_from, self.keep_dir, self.reports, self.checkpoints = start_from, keep_dir, [], []

    def get_checkpoint(self):
        return self.start_from

    def report(self, metrics, checkpoint=None):
        self.reports.append(dict(metrics))
        if checkpoint is not None:  # Tune persists it; the trial's temporary directory goes away
            dest = self.keep_dir / f"epoch_{metrics['epoch']}"
            shutil.copytree(checkpoint.path, dest)
            self.checkpoints.append(tune.Checkpoint.from_directory(str(dest)))


@pytest.fixture(scope="module")
def ctx(ray_local):
    job = tiny_job(epochs=2)
    torch.manual_seed(0)
    teacher = ray_local.put(job.model.build_teacher().state_dict())
    return job, SweepContext(base_job=job, workers=Workers(1, False, 1.0), storage="", constraints=Constraints(),
                             latency=lambda spec: {"latency_ms": 1.0}, teacher=[teacher])


def train_in_a_worker(job, context, start_from, keep_dir):
    """`_train_here` where it runs in a sweep: in a Ray worker (it reads the CPUs assigned to it)."""
    session = FakeSession(tune.Checkpoint.from_directory(start_from) if start_from else None, Path(keep_dir))
    real = trial_module.tune
    trial_module.tune = session
    try:
        last = _train_here(job, context, TrialReport({"latency_ms": 1.0}, Constraints(), "s", job.train.epochs))
    finally:
        trial_module.tune = real
    return session.reports, [c.path for c in session.checkpoints], last


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module


def run(ctx, start_from, keep_dir):
    job, context = ctx
    task = ray.remote(num_cpus=1)(train_in_a_worker)
    reports, checkpoints, last = ray.get(task.remote(job, context, start_from, str(keep_dir)))
    return SimpleNamespace(reports=reports, checkpoints=checkpoints), last


def test_a_trial_restored_after_its_last_epoch_reports_it_again(ctx, tmp_path):
    first, last = run(ctx, None, tmp_path / "a")
    assert [r["epoch"] for r in first.reports] == [1, 2] and last["status"] == "ok"

    again, final = run(ctx, first.checkpoints[-1], tmp_path / "b")
    assert len(again.reports) == 1 and not again.checkpoints, "nothing is trained again"
    assert final == again.reports[0]
    assert final["epoch"] == 2 and final["val_top1"] == last["val_top1"] and final["test_top1"] == last["test_top1"]
    assert final["resumed_from_epoch"] == 2  # its wall time spans the kill: left out of the overhead share

    rest, final = run(ctx, first.checkpoints[0], tmp_path / "c")
    assert [r["epoch"] for r in rest.reports] == [2] and final["resumed_from_epoch"] == 1
