"""The define-by-run search space shared by every backbone family, and how a point becomes a job.

A point is a flat dict of Optuna parameters. `define_space(...)` returns the function Optuna calls
(via Ray Tune's `OptunaSearch`) to sample one; `apply_point(job, point)` turns it into a
`DistillJob`. Positions are sampled as increasing block numbers whose ranges leave room for the
stages after them, and keep ratios have a floor that keeps >= 1 token: every point is valid by
construction, and `apply_point` still validates it with sit_core's schedule rules.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from dataclasses import dataclass


import torch

from sit_core.config import DistillJob, ModelSpec
from sit_core.schedule import SlimSchedule


@dataclass(frozen=True)
class SpaceBounds:
    """Ranges searched for one family (defaults fit a small ViT)."""

    max_stages: int = 3
    keep: tuple[float, float] = (0.3, 0.9)
    keep_step: float = 0.05
    lambda_token: tuple[float, float] = (0.25, 4.0)
    lambda_logits: tuple[float, float] = (0.25, 4.0)
    tau: tuple[float, float] = (1.0, 4.0)
    lr: tuple[float, float] = (2e-4, 3e-3)
    reducers: tuple[str, ...] = ("tsm",)


def define_space(depth: int, num_patches: int, bounds: SpaceBounds) -> "DefineByRunSpace":
    """The define-by-run function for `OptunaSearch(space=...)`."""
    return DefineByRunSpace(depth, num_patches, bounds)


@dataclass(frozen=True)
class DefineByRunSpace:
    """A callable class, not a closure: Tune pickles the searcher (with its space) to resume."""

    depth: int
    num_patches: int
    bounds: SpaceBounds

    def __call__(self, trial) -> None:
        b, depth = self.bounds, self.depth
        max_stages = max(1, min(b.max_stages, depth - 1))
        min_keep = _min_keep(self.num_patches, max_stages, b)
        # always a parameter, even with one choice: a point must name its reducer (apply_point
        # would otherwise fall back to the base job's, and `--reducers drop` searched TSMs)
        trial.suggest_categorical("reducer", list(b.reducers))
        n = trial.suggest_int("n_stages", 1, max_stages)
        low = 1
        for i in range(n):
            # leave one block for every later stage, and at least one block after the last reducer
            pos = trial.suggest_int(f"pos_{i + 1}", low, depth - (n - i))
            low = pos + 1
            trial.suggest_float(f"keep_{i + 1}", min_keep, b.keep[1], step=b.keep_step)
        trial.suggest_float("lambda_token", *b.lambda_token, log=True)
        trial.suggest_float("lambda_logits", *b.lambda_logits, log=True)
        trial.suggest_float("tau", *b.tau)
        trial.suggest_float("lr", *b.lr, log=True)


def _min_keep(num_patches: int, stages: int, bounds: SpaceBounds) -> float:
    """Smallest grid ratio >= bounds.keep[0] that still leaves >= 1 token after `stages` reducers."""
    lo, step = bounds.keep[0], bounds.keep_step
    k = lo
    while int(num_patches * k ** stages + 1e-6) < 1:
        k += step
    # stay on Optuna's step grid (low + i * step) and inside the high bound
    return min(round(k, 6), bounds.keep[1])


def apply_point(job: DistillJob, point: dict) -> DistillJob:
    """The base job with the sampled schedule, loss weights and lr; validated against the model."""
    job = copy.deepcopy(job)
    n = int(point["n_stages"])
    positions = tuple(int(point[f"pos_{i + 1}"]) for i in range(n))
    keep = tuple(float(point[f"keep_{i + 1}"]) for i in range(n))
    reducer = point.get("reducer", job.model.schedule.reducer if not job.model.schedule.is_identity else "tsm")
    schedule = SlimSchedule(positions, keep, reducer)
    schedule.validate_for(depth_of(job), num_patches_of(job))
    job.model = job.model.with_schedule(schedule)
    job.loss = dataclasses.replace(job.loss, lambda_token=float(point["lambda_token"]),
                                   lambda_logits=float(point["lambda_logits"]), tau=float(point["tau"]))
    job.train = dataclasses.replace(job.train, lr=float(point["lr"]))
    return job


def point_from(schedule: SlimSchedule, *, lambda_token=2.0, lambda_logits=2.0, tau=1.0, lr: float,
               with_reducer: bool = False) -> dict:
    """A warm-start point (the paper's configurations) in the space's parameter names."""
    point = {"n_stages": len(schedule.positions)}
    for i, (p, k) in enumerate(zip(schedule.positions, schedule.keep)):
        point[f"pos_{i + 1}"], point[f"keep_{i + 1}"] = p, k
    point.update(lambda_token=lambda_token, lambda_logits=lambda_logits, tau=tau, lr=lr)
    if with_reducer:
        point["reducer"] = schedule.reducer
    return point


def num_patches_of(job: DistillJob) -> int:
    kw = job.model.kwargs
    if "img_size" in kw and "patch_size" in kw:
        return (int(kw["img_size"]) // int(kw["patch_size"])) ** 2
    return _geometry_of(job)[1]


def depth_of(job: DistillJob) -> int:
    return int(job.model.kwargs.get("depth", 0)) or _geometry_of(job)[0]


def _geometry_of(job: DistillJob) -> tuple[int, int]:
    """(depth, num_patches) of the job's backbone, from a meta-device build: no weights are
    allocated or initialised (a real DeiT-S build took ~8 s on 2 cores, twice per apply_point)."""
    try:
        key = json.dumps(job.model.kwargs, sort_keys=True)
    except TypeError:  # kwargs that JSON cannot hold: not cached
        return _meta_geometry(job.model.backbone, dict(job.model.kwargs))
    return _cached_geometry(job.model.backbone, key)


@functools.lru_cache(maxsize=64)
def _cached_geometry(backbone: str, kwargs_json: str) -> tuple[int, int]:
    return _meta_geometry(backbone, json.loads(kwargs_json))


def _meta_geometry(backbone: str, kwargs: dict) -> tuple[int, int]:
    with torch.device("meta"):
        model = ModelSpec(backbone, kwargs).build_teacher(pretrained=False)
    return len(model.blocks), int(model.patch_embed.num_patches)


def fit_to_grid(value: float, low: float, step: float) -> float:
    """Snap a warm-start ratio onto Optuna's float grid so `points_to_evaluate` validates."""
    return round(low + math.floor((value - low) / step + 0.5) * step, 6)
