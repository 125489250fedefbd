"""One define-by-run space for any ViT: reducer, 1..3 slimming stages (positions, keep ratios),
FRD loss weights and learning rate.

A point is a flat dict of Optuna parameters (`pos_1`, `keep_1`, ..., `lambda_token`, ...). Positions
are sampled as increasing block numbers whose ranges leave room for the stages after them, and keep
ratios have a floor that leaves >= 1 token after the last stage: every point is valid by
construction, and `apply_point` still validates it with sit_core's schedule rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from sit_core.config import DistillJob, override
from sit_core.schedule import PAPER_SCHEDULES, SIT_LVVIT_VARIANTS, SlimSchedule


KEEP_STEP = 0.05   # the keep-ratio grid of models with many tokens (>= 20 patch tokens)
KEEP_GRID = 20     # coarser grids are multiples of 1/KEEP_GRID: 16 tokens -> step 0.1


@dataclass(frozen=True)
class SearchSpace:
    """The callable `Searcher`s hand to Optuna; a frozen dataclass, not a closure, so Tune can pickle it."""

    depth: int
    num_patches: int
    reducers: tuple[str, ...] = ("tsm",)
    max_stages: int = 3
    keep: tuple[float, float] = (0.3, 0.9)
    keep_step: float = KEEP_STEP
    lambda_token: tuple[float, float] = (0.25, 4.0)
    lambda_logits: tuple[float, float] = (0.25, 4.0)
    tau: tuple[float, float] = (1.0, 4.0)
    lr: tuple[float, float] = (2e-4, 3e-3)

    @classmethod
    def for_job(cls, job: DistillJob, reducers: Sequence[str] = ("tsm",)) -> "SearchSpace":
        """The space of the job's model: positions from its depth, keep ratios from its patch-token
        count (a grid step worth at least one token of the first stage). A reducer the model cannot
        serve (drop needs a class token...) raises ValueError with the model's one-line refusal."""
        geometry = job.model.geometry()  # refuses a backbone slimming cannot serve
        for reducer in reducers:
            why = job.model.refusal(SlimSchedule((1,), 0.5, reducer))
            if why:
                raise ValueError(f"--reducers {reducer} cannot serve {job.model.backbone}: {why}")
        step = max(KEEP_STEP, math.ceil(KEEP_GRID / geometry.num_patches) / KEEP_GRID)
        return cls(geometry.depth, geometry.num_patches, tuple(reducers), keep_step=step)

    @property
    def stages(self) -> int:
        return max(1, min(self.max_stages, self.depth - 1))

    @property
    def min_keep(self) -> float:
        """Smallest grid ratio >= keep[0] that still leaves >= 1 token after the most stages."""
        low, high = self.keep
        k = low
        while int(self.num_patches * k ** self.stages + 1e-6) < 1:
            k += self.keep_step
        return min(round(k, 6), high)

    @property
    def max_keep(self) -> float:
        """Largest grid ratio <= keep[1] (the grid starts at min_keep)."""
        low = self.min_keep
        return round(low + math.floor((self.keep[1] - low) / self.keep_step + 1e-6) * self.keep_step, 6)

    def __call__(self, trial) -> None:
        # always a parameter, even with one choice: a point must name its reducer
        trial.suggest_categorical("reducer", list(self.reducers))
        n = trial.suggest_int("n_stages", 1, self.stages)
        low = 1
        for i in range(n):
            # leave one block for every later stage, and at least one block after the last reducer
            pos = trial.suggest_int(f"pos_{i + 1}", low, self.depth - (n - i))
            low = pos + 1
            trial.suggest_float(f"keep_{i + 1}", self.min_keep, self.max_keep, step=self.keep_step)
        trial.suggest_float("lambda_token", *self.lambda_token, log=True)
        trial.suggest_float("lambda_logits", *self.lambda_logits, log=True)
        trial.suggest_float("tau", *self.tau)
        trial.suggest_float("lr", *self.lr, log=True)

    def on_grid(self, keep: float) -> float:
        """A ratio snapped onto Optuna's float grid (min_keep + i * step), so warm starts validate."""
        low = self.min_keep
        return min(round(low + math.floor((max(keep, low) - low) / self.keep_step + 0.5) * self.keep_step, 6),
                   self.max_keep)


def apply_point(job: DistillJob, point: dict) -> DistillJob:
    """The base job with the sampled schedule, loss weights and lr; validated against the model."""
    n = int(point["n_stages"])
    schedule = SlimSchedule(tuple(int(point[f"pos_{i + 1}"]) for i in range(n)),
                            tuple(float(point[f"keep_{i + 1}"]) for i in range(n)), point["reducer"])
    geometry = job.model.geometry()
    schedule.validate_for(geometry.depth, geometry.num_patches)
    return override(job, {"model.schedule": schedule, "loss.lambda_token": float(point["lambda_token"]),
                          "loss.lambda_logits": float(point["lambda_logits"]), "loss.tau": float(point["tau"]),
                          "train.lr": float(point["lr"])})


def point_from(schedule: SlimSchedule, *, lr: float, lambda_token: float = 2.0, lambda_logits: float = 2.0,
               tau: float = 1.0) -> dict:
    """A point in the space's parameter names (reference FRD weights by default)."""
    point = {"reducer": schedule.reducer, "n_stages": len(schedule.positions)}
    for i, (p, k) in enumerate(zip(schedule.positions, schedule.keep)):
        point[f"pos_{i + 1}"], point[f"keep_{i + 1}"] = p, k
    return {**point, "lambda_token": lambda_token, "lambda_logits": lambda_logits, "tau": tau, "lr": lr}


def warm_starts(job: DistillJob, space: SearchSpace) -> list[dict]:
    """The paper's schedules that fit this model, evaluated first: the DeiT schedule (TSMs at 1/4, 1/2,
    3/4 of the depth keeping 0.7) scaled to the depth, and every SiT LV-ViT row whose positions fit,
    each with the reference loss weights and the job's lr, once per searched reducer."""
    deit = PAPER_SCHEDULES["deit_flop_matched"].scaled_to(space.depth)
    schedules = [(deit.positions[:space.stages], space.on_grid(deit.keep[0]))]
    for variant in SIT_LVVIT_VARIANTS:
        row = PAPER_SCHEDULES[f"sit_lvvit_{variant}"].schedule
        candidate = (row.positions, space.on_grid(row.keep[0]))
        if max(row.positions) <= space.depth - 1 and len(row.positions) <= space.stages and candidate not in schedules:
            schedules.append(candidate)
    return [point_from(SlimSchedule(positions, keep, reducer), lr=job.train.lr)
            for positions, keep in schedules for reducer in space.reducers]
