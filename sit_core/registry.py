"""timm registrations of the SiT models: `timm.create_model("sit_deit_small", keep=0.5)` etc.

Each entry builds timm's own backbone (loading its pretrained weights from a local file if asked,
the timm way: `pretrained=True, pretrained_cfg_overlay=dict(file=...)`), then patches the schedule
in; default schedules come from `sit_core.schedule.PAPER_SCHEDULES`. Keyword arguments `schedule`,
`positions`, `keep`, `reducer`, `fuse_dropped`, `r` override the default; every other keyword is
timm's (`num_classes`, `img_size`, `drop_path_rate`, ...).

`features_only=True` works as for timm's ViT (features of the last 3 blocks by default, `out_indices`
to choose): the model is slimmed first, then wrapped. The features are (B, C, H, W) maps on the patch
grid, reduction = patch size, as timm's own ViT gives: a slimmed model's tokens are spread back over
the patch positions they stand for (`sit_core.features.GridFeatures`), so SiT backbones drop into
detection and segmentation code written for timm's features.
"""
from __future__ import annotations

import timm
from timm.models import register_model
from timm.models._builder import pretrained_cfg_for_features  # what build_model_with_cfg sets on a features model
from timm.models._features import FeatureGetterNet  # in _features.__all__, not re-exported by timm.models 1.0.31

from .features import GridFeatures
from .patch import apply_slimming
from .schedule import PAPER_SCHEDULES, SlimSchedule, as_schedule

SCHEDULE_KWARGS = ("schedule", "positions", "keep", "reducer", "fuse_dropped", "r")
VIT_FEATURE_BLOCKS = 3  # timm's default out_indices for vision_transformer features (the last 3 blocks)


def create_slimmed(base_name: str, default: SlimSchedule, pretrained: bool = False, **kwargs):
    """timm's `base_name` with the schedule from kwargs (falling back to `default`) applied."""
    sched_kw = {k: kwargs.pop(k) for k in SCHEDULE_KWARGS if k in kwargs}
    schedule = as_schedule(sched_kw.pop("schedule", None), default=default, **sched_kw)
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", VIT_FEATURE_BLOCKS)
    feature_cls = kwargs.pop("feature_cls", "getter")
    if features_only and feature_cls != "getter":
        raise ValueError(f"feature_cls={feature_cls!r}: slimmed models give features through forward_intermediates "
                         "(feature_cls='getter') only")
    if kwargs.get("pretrained_cfg") is None:
        kwargs.pop("pretrained_cfg", None)
    model = apply_slimming(timm.create_model(base_name, pretrained=pretrained, **kwargs), schedule)
    if not features_only:
        return model
    cfg = model.pretrained_cfg
    features = (FeatureGetterNet(model, out_indices=out_indices) if schedule.is_identity
                else GridFeatures(model, out_indices=out_indices))
    features.pretrained_cfg = features.default_cfg = pretrained_cfg_for_features(cfg)
    return features


def _paper(name: str, pretrained: bool, **kwargs):
    row = PAPER_SCHEDULES[name]
    if row.backbone.startswith("lvvit_"):
        from . import lvvit  # noqa: F401  (registers the lvvit_* backbones with timm)
    return create_slimmed(row.backbone, row.schedule, pretrained, **kwargs)


def _deit(size: str, pretrained: bool, **kwargs):
    default = PAPER_SCHEDULES["deit_flop_matched"].schedule
    return create_slimmed(f"deit_{size}_patch16_224", default, pretrained, **kwargs)


@register_model
def sit_deit_tiny(pretrained: bool = False, **kwargs):
    """DeiT-Ti (224, patch 16) with TSMs after blocks 3, 6, 9 keeping 0.7."""
    return _deit("tiny", pretrained, **kwargs)


@register_model
def sit_deit_small(pretrained: bool = False, **kwargs):
    """DeiT-S (224, patch 16) with TSMs after blocks 3, 6, 9 keeping 0.7."""
    return _deit("small", pretrained, **kwargs)


@register_model
def sit_deit_base(pretrained: bool = False, **kwargs):
    """DeiT-B (224, patch 16) with TSMs after blocks 3, 6, 9 keeping 0.7."""
    return _deit("base", pretrained, **kwargs)


@register_model
def sit_lvvit_tiny(pretrained: bool = False, **kwargs):
    """SiT-T: LV-ViT-T (320, 14 blocks) with TSMs after blocks 1, 2, 3 keeping 0.5."""
    return _paper("sit_lvvit_tiny", pretrained, **kwargs)


@register_model
def sit_lvvit_xsmall(pretrained: bool = False, **kwargs):
    """SiT-XS: LV-ViT-S (384, 16 blocks) with TSMs after blocks 1, 2, 3 keeping 0.5."""
    return _paper("sit_lvvit_xsmall", pretrained, **kwargs)


@register_model
def sit_lvvit_small(pretrained: bool = False, **kwargs):
    """SiT-S: LV-ViT-S (384, 16 blocks) with TSMs after blocks 9, 12, 14 keeping 0.5."""
    return _paper("sit_lvvit_small", pretrained, **kwargs)


@register_model
def sit_lvvit_medium(pretrained: bool = False, **kwargs):
    """SiT-M: LV-ViT-M (512, 20 blocks) with TSMs after blocks 10, 14, 17 keeping 0.5."""
    return _paper("sit_lvvit_medium", pretrained, **kwargs)


@register_model
def sit_lvvit_large(pretrained: bool = False, **kwargs):
    """SiT-L: LV-ViT-L (768, 24 blocks, 288 px) with TSMs after blocks 10, 14, 17 keeping 0.5."""
    return _paper("sit_lvvit_large", pretrained, **kwargs)
