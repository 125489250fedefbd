"""The reducer comparison (sweeps/compare_reducers.py) compares like with like: every arm at one
schedule removes the same MACs, arms differ only in what they name, and one run trains for real."""
from __future__ import annotations

import pytest

from sit_core.flops import count_macs
from sit_core.presets import get_preset
from sweeps.compare_reducers import ARMS, SCHEDULES, arm_job, run_one

from conftest import tiny_job


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_arm_removes_the_same_macs_as_sit(schedule):
    base = get_preset("fmnist-cpu")
    macs = {arm: count_macs(arm_job(base, arm, schedule, 1, 0).model.build(), 28, 1) for arm in ARMS}
    teacher = count_macs(base.model.teacher().build(), 28, 1)
    target = {"1.7x": 1.7, "3.5x": 3.5}[schedule]
    assert teacher / macs["sit"] == pytest.approx(target, rel=0.03)
    for arm, m in macs.items():
        assert m == pytest.approx(macs["sit"], rel=0.03), arm


def test_arms_differ_only_in_reducer_init_and_loss():
    base = get_preset("fmnist-cpu")
    jobs = {arm: arm_job(base, arm, "1.7x", 5, 2) for arm in ARMS}
    assert {j.model.schedule.reducer for j in jobs.values()} == {"tsm", "drop", "merge"}
    assert jobs["sit+pool"].train.tsm_init == "pool" and jobs["sit"].train.tsm_init == "random"
    assert jobs["ce-only"].loss.lambda_token == 0 == jobs["ce-only"].loss.lambda_logits
    assert jobs["drop"].model.schedule.fuse_dropped
    for job in jobs.values():  # budget x5 is 5x the steps per epoch; seed reaches the recipe
        assert job.train.max_steps_per_epoch == 5 * base.train.max_steps_per_epoch and job.train.seed == 2
        assert job.train.epochs == base.train.epochs and job.train.lr == base.train.lr


def test_one_run_trains_with_the_projects_code():
    job = tiny_job()
    teacher_state = job.model.build_teacher().state_dict()
    result = run_one(job, teacher_state, threads=1)
    assert result["status"] == "ok" and result["steps"] == job.train.max_steps_per_epoch * job.train.epochs
    assert 0 < result["mmacs"] < count_macs(job.model.build_teacher(), 28, 1) / 1e6
