"""Search space for timm ViTs (DeiT, and the small Fashion-MNIST ViT): SiT's and the peers'
published DeiT schedules are the warm-start points."""
from __future__ import annotations

from typing import Callable

from sit_core.config import DistillJob
from sit_core.schedule import SlimSchedule

from .common import SpaceBounds, define_space, depth_of, fit_to_grid, num_patches_of, point_from

BOUNDS = SpaceBounds()


def space(job: DistillJob, reducers=("tsm",)) -> Callable:
    bounds = SpaceBounds(**{**BOUNDS.__dict__, "reducers": tuple(reducers)})
    return define_space(depth_of(job), num_patches_of(job), bounds)


def warm_starts(job: DistillJob, reducers=("tsm",)) -> list[dict]:
    """SPEC's DeiT schedule (TSMs at 1/4, 1/2, 3/4 depth keeping 0.7 — 3, 6, 9 on DeiT) and SiT's
    reference slimming (after blocks 1, 2, 3 keeping 0.5), both with the reference loss weights."""
    d = depth_of(job)
    lr = job.train.lr
    low = _low_keep(job)
    points = []
    for positions, keep in (((d // 4, d // 2, 3 * d // 4), 0.7), ((1, 2, 3), 0.5)):
        positions = tuple(sorted(set(max(1, min(p, d - 1)) for p in positions)))
        keep = fit_to_grid(max(keep, low), low, BOUNDS.keep_step)
        for reducer in reducers:
            points.append(point_from(SlimSchedule(positions, keep, reducer), lr=lr, with_reducer=True))
    return points


def _low_keep(job: DistillJob) -> float:
    from .common import _min_keep
    return _min_keep(num_patches_of(job), BOUNDS.max_stages, BOUNDS)
