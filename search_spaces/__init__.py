"""The search space of a sweep: one define-by-run space for every backbone, its geometry (depth,
patch tokens) taken from sit_core, warm starts from the paper's schedules, and how a sampled point
becomes a `DistillJob` (through `sit_core.config.override`, like every other change to a job)."""
from .space import SearchSpace, apply_point, point_from, warm_starts

__all__ = ["SearchSpace", "apply_point", "point_from", "warm_starts"]
