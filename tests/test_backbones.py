"""Which timm backbones apply_slimming serves, and one-line refusals (before anything changes) for the rest.

Every model here is a tiny instance of the family (small img_size/depth/width kwargs, no downloads).
"""
import pytest
import timm
import torch

from sit_core import apply_slimming
from sit_core.patch import WORKING_FAMILIES

TINY = dict(depth=2, embed_dim=32, num_heads=2, num_classes=3)

# family -> (timm name, kwargs, image size, patch tokens)
WORKS = {
    "ViT": ("vit_tiny_patch16_224", dict(img_size=64), 64, 16),
    "DeiT": ("deit_tiny_patch16_224", dict(img_size=64), 64, 16),
    "distilled DeiT": ("deit_tiny_distilled_patch16_224", dict(img_size=64), 64, 16),
    "DeiT-3": ("deit3_small_patch16_224", dict(img_size=64), 64, 16),
    "DINOv2 with registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=56), 56, 16),
    "CLIP ViT": ("vit_base_patch16_clip_224", dict(img_size=64), 64, 16),
    "global-average-pool ViT": ("vit_medium_patch16_gap_256", dict(img_size=64), 64, 16),
    "LV-ViT": ("lvvit_tiny", dict(img_size=64), 64, 16),
}


@pytest.mark.parametrize("family", list(WORKS))
@pytest.mark.parametrize("schedule", ["1@0.5", "drop:1@0.5+fuse", "merge:1@0.5", "merge:r3"])
def test_known_families_slim_and_run(family, schedule):
    import sit_core.lvvit  # noqa: F401  (registers lvvit_*)
    name, kw, img, patches = WORKS[family]
    model = timm.create_model(name, **{**TINY, **kw}).eval()
    if schedule.startswith("drop") and model.cls_token is None:
        with pytest.raises(ValueError, match="the model has no class token"):
            apply_slimming(model, schedule)
        return
    apply_slimming(model, schedule)
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        out = model(torch.randn(2, 3, img, img))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert seen == [model.num_prefix_tokens + model.slim_tokens[1]] and model.slim_tokens[1] < patches


def _eva():
    return timm.create_model("vit_small_patch16_rope_224", img_size=32, **TINY)


def _eva02():
    return timm.create_model("eva02_tiny_patch14_224", img_size=28, **TINY)


def _beit():
    return timm.create_model("beit_base_patch16_224", img_size=32, **TINY)


def _relpos():
    return timm.create_model("vit_relpos_small_patch16_224", img_size=32, **TINY)


def _features_only():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, features_only=True, out_indices=2, **TINY)


def _resnet():
    return timm.create_model("resnet10t", num_classes=3)


REFUSED = {  # builder -> what the one line must say
    "RoPE ViT": (_eva, "rotary position terms"),
    "EVA-02": (_eva02, "rotary position terms"),
    "BEiT": (_beit, "relative position bias"),
    "relpos ViT": (_relpos, "relative position bias"),
    "features_only wrapper": (_features_only, "features_only wrapper"),
    "ResNet": (_resnet, "not a timm VisionTransformer"),
}


@pytest.mark.parametrize("family", list(REFUSED))
def test_unsupported_backbones_are_refused_in_one_line_before_anything_changes(family):
    build, why = REFUSED[family]
    model = build()
    classes = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    with pytest.raises(ValueError) as e:
        apply_slimming(model, "1@0.5")
    message = str(e.value)
    assert "\n" not in message and why in message and WORKING_FAMILIES in message
    assert message.startswith(f"cannot slim {type(model).__name__}: ")
    assert [type(m) for m in model.modules()] == classes and list(model.state_dict()) == keys
    assert not hasattr(model, "slim_schedule")


@pytest.mark.parametrize("kwargs, schedule, why", [
    (dict(dynamic_img_size=True), "1@0.5", "build the model with dynamic_img_size=False"),
    (dict(patch_drop_rate=0.25), "1@0.5", "build the model with patch_drop_rate=0"),
    (dict(block_fn=timm.models.vision_transformer.ParallelScalingBlock), "drop:1@0.5",
     "needs timm's Block with timm's Attention (or LV-ViT's block), got ParallelScalingBlock"),
])
def test_vits_the_schedule_cannot_serve_are_refused(kwargs, schedule, why):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, **TINY, **kwargs)
    with pytest.raises(ValueError) as e:
        apply_slimming(model, schedule)
    assert why in str(e.value) and "\n" not in str(e.value)
    assert not hasattr(model.blocks[0], "slim")


def test_tsm_serves_any_block_class_and_a_slimmed_model_is_not_slimmed_twice():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, block_fn=timm.models.vision_transformer.ParallelScalingBlock, **TINY)
    apply_slimming(model, "1@0.5")  # a TSM only post-processes the block's output
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="already slimmed with tsm:1@0.5"):
        apply_slimming(model, "1@0.5")
