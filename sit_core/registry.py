"""timm registrations of the SiT models: `timm.create_model("sit_deit_small", keep=0.5)` etc.

Each entry builds timm's own backbone (loading its pretrained weights from a local file if asked,
the timm way: `pretrained=True, pretrained_cfg_overlay=dict(file=...)`), then patches the
schedule in. Keyword arguments `schedule`, `positions`, `keep`, `reducer`, `fuse_dropped` override the default.
"""
from __future__ import annotations

import timm
from timm.models import register_model

from .patch import apply_slimming
from .schedule import SlimSchedule, as_schedule

# The peers' FLOP-matched DeiT schedule (SPEC "Backbones"): after blocks 3, 6, 9, keep 0.7.
DEIT_SCHEDULE = SlimSchedule(positions=(3, 6, 9), keep=(0.7,))

SCHEDULE_KWARGS = ("schedule", "positions", "keep", "reducer", "fuse_dropped")


def create_slimmed(base_name: str, default: SlimSchedule, pretrained: bool = False, **kwargs):
    """timm's `base_name` with the schedule from kwargs (falling back to `default`) applied."""
    sched_kw = {k: kwargs.pop(k) for k in SCHEDULE_KWARGS if k in kwargs}
    schedule = as_schedule(sched_kw.pop("schedule", None), default=default, **sched_kw)
    if kwargs.get("pretrained_cfg") is None:
        kwargs.pop("pretrained_cfg", None)
    model = timm.create_model(base_name, pretrained=pretrained, **kwargs)
    return apply_slimming(model, schedule)


@register_model
def sit_deit_tiny(pretrained: bool = False, **kwargs):
    """DeiT-Ti (224, patch 16) with TSMs after blocks 3, 6, 9 keeping 0.7."""
    return create_slimmed("deit_tiny_patch16_224", DEIT_SCHEDULE, pretrained, **kwargs)


@register_model
def sit_deit_small(pretrained: bool = False, **kwargs):
    """DeiT-S (224, patch 16) with TSMs after blocks 3, 6, 9 keeping 0.7."""
    return create_slimmed("deit_small_patch16_224", DEIT_SCHEDULE, pretrained, **kwargs)


@register_model
def sit_deit_base(pretrained: bool = False, **kwargs):
    """DeiT-B (224, patch 16) with TSMs after blocks 3, 6, 9 keeping 0.7."""
    return create_slimmed("deit_base_patch16_224", DEIT_SCHEDULE, pretrained, **kwargs)


def _sit_lvvit(variant: str, pretrained: bool, **kwargs):
    from .lvvit import SIT_LVVIT_SCHEDULES  # registers the lvvit_* teachers with timm

    row = SIT_LVVIT_SCHEDULES[variant]
    default = SlimSchedule(positions=row.tsm_after, keep=(row.keep_ratio,))
    return create_slimmed(f"lvvit_{row.teacher}", default, pretrained, **kwargs)


@register_model
def sit_lvvit_tiny(pretrained: bool = False, **kwargs):
    """SiT-T: LV-ViT-T (320, 14 blocks) with TSMs after blocks 1, 2, 3 keeping 0.5."""
    return _sit_lvvit("tiny", pretrained, **kwargs)


@register_model
def sit_lvvit_xsmall(pretrained: bool = False, **kwargs):
    """SiT-XS: LV-ViT-S (384, 16 blocks) with TSMs after blocks 1, 2, 3 keeping 0.5."""
    return _sit_lvvit("xsmall", pretrained, **kwargs)


@register_model
def sit_lvvit_small(pretrained: bool = False, **kwargs):
    """SiT-S: LV-ViT-S (384, 16 blocks) with TSMs after blocks 9, 12, 14 keeping 0.5."""
    return _sit_lvvit("small", pretrained, **kwargs)


@register_model
def sit_lvvit_medium(pretrained: bool = False, **kwargs):
    """SiT-M: LV-ViT-M (512, 20 blocks) with TSMs after blocks 10, 14, 17 keeping 0.5."""
    return _sit_lvvit("medium", pretrained, **kwargs)


@register_model
def sit_lvvit_large(pretrained: bool = False, **kwargs):
    """SiT-L: LV-ViT-L (768, 24 blocks, 288 px) with TSMs after blocks 10, 14, 17 keeping 0.5."""
    return _sit_lvvit("large", pretrained, **kwargs)
