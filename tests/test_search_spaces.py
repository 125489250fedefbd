"""The define-by-run search spaces (no Ray): every sampled point is a valid candidate, the warm
starts (the paper's schedules) lie in the space, and the space survives Tune's pickling.

Points are drawn the way Ray's OptunaSearch draws them: `study.ask()`, then the space is called on
the trial; its `trial.params` (plus whatever the space returns) is the Tune config. Models of the
ImageNet presets are built on the meta device (shapes only, no weights), the small Fashion-MNIST
ones for real with a forward pass.
"""
from __future__ import annotations

import copy
import math
import pickle

import optuna
import pytest
import torch

import search_spaces
from search_spaces import SearchSpace, warm_starts
from sit_core.schedule import PAPER_SCHEDULES, SIT_LVVIT_VARIANTS
from sit_core.presets import get_preset, smoke

optuna.logging.set_verbosity(optuna.logging.WARNING)

PRESETS = ["fmnist-cpu", "deit-small-imagenet", "lvvit-small-imagenet"]
REDUCER_SETS = [("tsm",), ("tsm", "drop", "merge"), ("drop",), ("merge",)]
N_POINTS = 200
# Models built and run: every 10th point of the Fashion-MNIST space (for real, 1 thread), every 25th of
# the ImageNet ones (meta device), and every warm start. The schedule's token counts are checked on all.
BUILD_EVERY = {"fmnist-cpu": 10}
BUILD_EVERY_DEFAULT = 25


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models: threads only add contention on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def job_for(preset):
    job = get_preset(preset)
    return smoke(job) if preset == "fmnist-cpu" else job   # the smoke job is what CI sweeps


def sample(job, reducers, sampler, n=N_POINTS):
    """n configs as Tune would get them, the study told a made-up result after each (so TPE models)."""
    space = SearchSpace.for_job(job, reducers)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    configs = []
    for i in range(n):
        trial = study.ask()
        extra = space(trial) or {}
        config = {**trial.params, **extra}
        configs.append(config)
        # a plausible trade-off: more tokens kept -> more accurate and slower
        keep = math.prod(config[f"keep_{s + 1}"] for s in range(config["n_stages"]))
        study.tell(trial, [50 + 40 * keep, 1 + 9 * keep])
    return configs


def token_counts(model, preset, job):
    """Patch tokens entering each block, observed in a forward pass."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1])) for b in model.blocks]
    try:
        x = torch.zeros(2, job.data.in_chans, job.data.img_size, job.data.img_size,
                        device="meta" if preset != "fmnist-cpu" else "cpu")
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    assert tuple(logits.shape) == (2, job.model.kwargs["num_classes"])
    return [n - model.num_prefix_tokens for n in seen]


def build(job, preset):
    if preset == "fmnist-cpu":
        return job.model.build().eval()
    with torch.device("meta"):
        return job.model.build().eval()


def check_point(base, config, reducers, preset, *, build_model):
    job = search_spaces.apply_point(base, config)    # raises on any schedule the model cannot run
    depth, patches = base.model.geometry().depth, base.model.geometry().num_patches
    sched = job.model.schedule
    assert 1 <= len(sched.positions) <= 3
    assert all(1 <= p <= depth - 1 for p in sched.positions)
    assert list(sched.positions) == sorted(set(sched.positions))
    assert all(0.3 - 1e-9 <= k <= 0.9 + 1e-9 for k in sched.keep)
    assert sched.reducer in reducers, (sched.reducer, reducers)
    assert min(sched.block_tokens(depth, patches)) >= 1
    assert job.loss.lambda_token == config["lambda_token"] and job.train.lr == config["lr"]
    assert 0.25 <= job.loss.lambda_logits <= 4.0 and 1.0 <= job.loss.tau <= 4.0
    if build_model:
        model = build(job, preset)
        assert model.slim_tokens == sched.block_tokens(depth, patches)
        counts = token_counts(model, preset, job)
        assert counts == model.slim_tokens
        assert min(counts) >= 1
    return job


# every preset with TSM alone and with all three reducers; the single-peer sweeps on one preset
COMBOS = [(p, r) for p in PRESETS for r in REDUCER_SETS[:2]] + [("fmnist-cpu", r) for r in REDUCER_SETS[2:]]


@pytest.mark.parametrize("sampler_name", ["random", "tpe"])
@pytest.mark.parametrize("preset, reducers", COMBOS, ids=[f"{p}-{'-'.join(r)}" for p, r in COMBOS])
def test_every_sampled_point_is_a_valid_candidate(preset, reducers, sampler_name):
    base = job_for(preset)
    before = copy.deepcopy(base.to_dict())
    sampler = (optuna.samplers.RandomSampler(seed=1) if sampler_name == "random"
               else optuna.samplers.TPESampler(seed=1, multivariate=True, n_startup_trials=10))
    configs = sample(base, reducers, sampler)
    seen_reducers, seen_stages = set(), set()
    for i, config in enumerate(configs):
        job = check_point(base, config, reducers, preset,
                          build_model=i % BUILD_EVERY.get(preset, BUILD_EVERY_DEFAULT) == 0)
        seen_reducers.add(job.model.schedule.reducer)
        seen_stages.add(len(job.model.schedule.positions))
    assert base.to_dict() == before, "apply_point must not mutate the base job"
    assert seen_reducers == set(reducers), "every reducer competes"
    assert seen_stages == {1, 2, 3}
    assert len({str(c) for c in configs}) > N_POINTS * 0.9, "the sampler explores (few repeats)"


def test_keep_floor_leaves_a_token_on_tiny_grids():
    """A 4x4-patch model with 3 stages: the floor of keep rises so that 0.3**3 * 16 < 1 never happens."""
    space = SearchSpace(depth=4, num_patches=16)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(300):
        trial = study.ask()
        space(trial)
        p = trial.params
        keep = [p[f"keep_{s + 1}"] for s in range(p["n_stages"])]
        assert int(16 * math.prod(keep) + 1e-6) >= 1
        study.tell(trial, 0.0)


# ---------------------------------------------------------------- warm starts

def enqueue_and_sample(job, reducers, points):
    """Enqueue the warm starts as Ray's OptunaSearch does; the space must reproduce them exactly."""
    space = SearchSpace.for_job(job, reducers)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=0))
    for point in points:
        study.enqueue_trial(point)
    got = []
    for _ in points:
        trial = study.ask()
        extra = space(trial) or {}
        got.append({**trial.params, **extra})
        study.tell(trial, [1.0, 1.0])
    return got


def schedule_of(job, point):
    return search_spaces.apply_point(job, point).model.schedule


@pytest.mark.parametrize("reducers", REDUCER_SETS, ids="-".join)
@pytest.mark.parametrize("preset", PRESETS)
def test_warm_starts_are_in_the_space(preset, reducers):
    job = job_for(preset)
    points = warm_starts(job, SearchSpace.for_job(job, reducers))
    assert points
    got = enqueue_and_sample(job, reducers, points)
    for point, sampled in zip(points, got):
        assert sampled == pytest.approx(point), "a warm start outside the space is silently replaced"
        assert set(sampled) == set(point)
    for point in points:
        check_point(job, point, reducers, preset, build_model=True)
    # every reducer gets every warm-start schedule
    by_reducer = {}
    for p in points:
        s = schedule_of(job, p)
        by_reducer.setdefault(s.reducer, set()).add((s.positions, s.keep))
    assert set(by_reducer) == set(reducers)
    assert len({frozenset(v) for v in by_reducer.values()}) == 1


@pytest.mark.parametrize("preset", ["deit-small-imagenet", "deit-tiny-imagenet", "deit-base-imagenet"])
def test_deit_warm_starts_hold_the_spec_schedule(preset):
    job = get_preset(preset)
    schedules = {(s.positions, s.keep, s.reducer)
                 for s in (schedule_of(job, p) for p in warm_starts(job, SearchSpace.for_job(job)))}
    assert ((3, 6, 9), (0.7, 0.7, 0.7), "tsm") in schedules          # docs/method.md's DeiT schedule
    assert ((1, 2, 3), (0.5, 0.5, 0.5), "tsm") in schedules          # SiT's reference slimming
    assert schedule_of(job, warm_starts(job, SearchSpace.for_job(job))[0]) == job.model.schedule


@pytest.mark.parametrize("preset", ["lvvit-small-imagenet", "lvvit-tiny-imagenet", "lvvit-medium-imagenet",
                                    "lvvit-large-imagenet"])
def test_lvvit_warm_starts_hold_the_table_rows(preset):
    job = get_preset(preset)
    depth = job.model.geometry().depth
    schedules = {(s.positions, s.keep) for s in
                 (schedule_of(job, p) for p in warm_starts(job, SearchSpace.for_job(job)))}
    rows = [PAPER_SCHEDULES[f"sit_lvvit_{v}"].schedule for v in SIT_LVVIT_VARIANTS]
    table_rows = {(row.positions, row.keep) for row in rows if max(row.positions) <= depth - 1}
    deit_scaled = (tuple(p * depth // 12 for p in (3, 6, 9)), (0.7,) * 3)
    assert schedules == table_rows | {deit_scaled}
    # the preset's own row (its student) is always among them
    assert (job.model.schedule.positions, job.model.schedule.keep) in schedules
    if preset == "lvvit-small-imagenet":
        assert schedules == {((1, 2, 3), (0.5,) * 3), ((9, 12, 14), (0.5,) * 3), ((4, 8, 12), (0.7,) * 3)}


def test_fmnist_warm_starts_fit_the_small_model():
    job = job_for("fmnist-cpu")  # depth 4: quarter/half/three-quarter depth is 1, 2, 3
    schedules = {(s.positions, s.keep) for s in
                 (schedule_of(job, p) for p in warm_starts(job, SearchSpace.for_job(job)))}
    assert schedules == {((1, 2, 3), (0.7,) * 3), ((1, 2, 3), (0.5,) * 3)}
    full = get_preset("fmnist-cpu")  # depth 6
    schedules = {(s.positions, s.keep) for s in
                 (schedule_of(full, p) for p in warm_starts(full, SearchSpace.for_job(full)))}
    assert schedules == {((1, 3, 4), (0.7,) * 3), ((1, 2, 3), (0.5,) * 3)}


def test_single_peer_reducer_is_searched():
    """`--reducers drop` must sweep the drop peer, not the base job's TSM."""
    job = job_for("fmnist-cpu")
    for reducer in ("drop", "merge"):
        configs = sample(job, (reducer,), optuna.samplers.RandomSampler(seed=0), n=5)
        assert {schedule_of(job, c).reducer for c in configs} == {reducer}
        warm = warm_starts(job, SearchSpace.for_job(job, (reducer,)))
        assert {schedule_of(job, p).reducer for p in warm} == {reducer}


# ---------------------------------------------------------------- pickling

@pytest.mark.parametrize("preset", PRESETS)
def test_space_pickles(preset):
    job = job_for(preset)
    space = SearchSpace.for_job(job, ("tsm", "drop"))
    clone = pickle.loads(pickle.dumps(space))
    assert clone == space
    # the clone defines the same distributions: the same seed gives the same points
    a = sample(job, ("tsm", "drop"), optuna.samplers.RandomSampler(seed=3), n=5)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=3))
    b = []
    for _ in range(5):
        t = study.ask()
        extra = clone(t) or {}
        b.append({**t.params, **extra})
        keep = math.prod(b[-1][f"keep_{s + 1}"] for s in range(b[-1]["n_stages"]))
        study.tell(t, [50 + 40 * keep, 1 + 9 * keep])
    assert a == b


def test_apply_point_refuses_a_schedule_the_model_cannot_run():
    job = job_for("fmnist-cpu")  # depth 4
    point = warm_starts(job, SearchSpace.for_job(job))[0]
    with pytest.raises(ValueError, match="out of range"):
        search_spaces.apply_point(job, {**point, "pos_3": 4})
