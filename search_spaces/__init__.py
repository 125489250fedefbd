"""Search spaces, one module per backbone family: `space(job)` for Optuna, `warm_starts(job)`
(the paper's configurations, evaluated first), and `apply_point(job, point)` to build a candidate."""
from . import lvvit, vit
from .common import apply_point

FAMILIES = {"vit": vit, "lvvit": lvvit}


def family_of(job) -> str:
    return "lvvit" if job.model.backbone.startswith("lvvit") else "vit"


def for_job(job):
    """The family module searching this job's backbone."""
    return FAMILIES[family_of(job)]


__all__ = ["FAMILIES", "apply_point", "family_of", "for_job"]
