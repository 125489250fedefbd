"""Search space for LV-ViT backbones: the SPEC table's SiT-T/XS/S/M/L schedules are warm starts."""
from __future__ import annotations

from typing import Callable

from sit_core.config import DistillJob
from sit_core.lvvit import SIT_LVVIT_SCHEDULES
from sit_core.schedule import SlimSchedule

from .common import SpaceBounds, define_space, depth_of, num_patches_of, point_from

BOUNDS = SpaceBounds(keep=(0.3, 0.9))


def space(job: DistillJob, reducers=("tsm",)) -> Callable:
    bounds = SpaceBounds(**{**BOUNDS.__dict__, "reducers": tuple(reducers)})
    return define_space(depth_of(job), num_patches_of(job), bounds)


def warm_starts(job: DistillJob, reducers=("tsm",)) -> list[dict]:
    """Every SPEC-table schedule that fits this depth, with the reference loss weights."""
    d, points, seen = depth_of(job), [], set()
    for row in SIT_LVVIT_SCHEDULES.values():
        if row.tsm_after in seen or max(row.tsm_after) > d - 1:
            continue
        seen.add(row.tsm_after)
        for reducer in reducers:
            points.append(point_from(SlimSchedule(row.tsm_after, row.keep_ratio, reducer), lr=job.train.lr,
                                     with_reducer=True))
    return points
