"""The registered models: token counts, class-token bypass, reducers, timm conventions."""
import pytest
import timm
import torch

import sit_core
from sit_core.peers import BipartiteMerge, TopKDrop
from sit_core.slimming import ReverseTokenSlimming, TokenSlimming

DEIT = ["sit_deit_tiny", "sit_deit_small", "sit_deit_base"]


def entering_tokens(model, x):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return seen, out


@pytest.mark.parametrize("name", DEIT)
def test_deit_variants_at_224_slim_after_blocks_3_6_9_keeping_07(name):
    model = timm.create_model(name, num_classes=10).eval()
    seen, out = entering_tokens(model, torch.randn(1, 3, 224, 224))
    # +1: the class token rides along, untouched, outside the reducers.
    assert seen == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert out.shape == (1, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("reducer", ["tsm", "drop", "merge"])
@pytest.mark.parametrize("keep", [0.7, (0.5, 0.5, 0.5), (0.9, 0.3, 0.6)])
def test_every_reducer_produces_the_scheduled_token_counts(reducer, keep):
    model = timm.create_model("sit_deit_tiny", reducer=reducer, keep=keep, img_size=96, num_classes=5).eval()
    counts = model.slim_schedule.block_tokens(12, 36)
    seen, out = entering_tokens(model, torch.randn(2, 3, 96, 96))
    assert seen == [c + 1 for c in counts]
    assert torch.isfinite(out).all()


def test_drop_with_fusion_keeps_the_count():
    model = timm.create_model("sit_deit_tiny", reducer="drop", fuse_dropped=True, img_size=96).eval()
    seen, _ = entering_tokens(model, torch.randn(2, 3, 96, 96))
    assert seen == [37] * 3 + [26] * 3 + [18] * 3 + [13] * 3


@pytest.mark.parametrize("reducer", ["tsm", "drop", "merge"])
def test_class_token_bypasses_reducers(reducer):
    model = timm.create_model("sit_deit_tiny", reducer=reducer, img_size=64).eval()
    block = model.blocks[2]
    entering = []
    block.slim.register_forward_pre_hook(lambda m, a: entering.append(a[0]))
    x = torch.randn(2, 17, model.embed_dim)
    with torch.no_grad():
        out = block(x)
    assert out.shape[1] == 1 + 11
    torch.testing.assert_close(out[:, 0], entering[0][:, 0])  # class token passes through unchanged
    if reducer == "tsm":  # and the class token's value cannot influence the slimmed patch tokens
        shifted = entering[0].clone()
        shifted[:, 0] += 100.0
        torch.testing.assert_close(block.slim(shifted)[:, 1:], out[:, 1:])


def test_none_reducer_is_the_plain_vit():
    torch.manual_seed(0)
    plain = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=3).eval()
    slim = timm.create_model("sit_deit_tiny", reducer="none", img_size=64, num_classes=3).eval()
    slim.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(slim(x), plain(x))


def test_created_model_is_inference_only():
    model = timm.create_model("sit_deit_small", num_classes=10, img_size=64)
    assert not any(isinstance(m, ReverseTokenSlimming) for m in model.modules())
    assert sum(isinstance(m, TokenSlimming) for m in model.modules()) == 3
    assert not any("rtsm" in k for k in model.state_dict())
    for mode in (True, False):
        model.train(mode)
        out = model(torch.randn(2, 3, 64, 64))
        assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_peers_add_no_parameters():
    plain = timm.create_model("deit_tiny_patch16_224")
    for reducer, cls in (("drop", TopKDrop), ("merge", BipartiteMerge)):
        model = timm.create_model("sit_deit_tiny", reducer=reducer)
        assert any(isinstance(m, cls) for m in model.modules())
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())


def test_timm_kwargs_override_schedule_and_shape():
    model = timm.create_model("sit_deit_tiny", positions=(2, 4), keep=0.5, img_size=128, in_chans=1, num_classes=7)
    assert model.slim_schedule.positions == (2, 4)
    assert model.slim_tokens[:5] == [64, 64, 32, 32, 16]
    assert model(torch.randn(1, 1, 128, 128)).shape == (1, 7)
    with pytest.raises(ValueError, match="valid positions are 1..11"):
        timm.create_model("sit_deit_tiny", positions=(3, 12))


def test_merge_averages_by_size():
    # Two identical-key tokens merged: result is their size-weighted mean.
    from sit_core.peers import MergeState
    merge = BipartiteMerge(in_tokens=4, out_tokens=3, state=MergeState(), first=True)
    x = torch.tensor([[[0.0], [10.0], [5.0], [7.0]]])
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    out = merge(x, keys)
    assert out.shape == (1, 3, 1)
    assert sorted(out.flatten().tolist()) == [5.0, 5.0, 7.0]  # 0 and 10 merged into 5
    assert merge.state.size.flatten().tolist().count(2.0) == 1


def test_drop_keeps_the_most_attended_tokens():
    drop = TopKDrop(in_tokens=4, out_tokens=2)
    x = torch.arange(4.0).view(1, 4, 1)
    attn = torch.tensor([[0.1, 0.5, 0.05, 0.35]])
    assert drop(x, attn).flatten().tolist() == [1.0, 3.0]
    fused = TopKDrop(in_tokens=4, out_tokens=2, fuse=True)(x, attn).flatten().tolist()
    assert fused[0] == 1.0 and fused[1] == pytest.approx((0.1 * 0 + 0.05 * 2 + 0.35 * 3) / 0.5)


LVVIT = {  # SPEC table: name -> (img_size, depth, TSM after blocks)
    "sit_lvvit_tiny": (224, 14, (1, 2, 3)),
    "sit_lvvit_xsmall": (224, 16, (1, 2, 3)),
    "sit_lvvit_small": (224, 16, (9, 12, 14)),
    "sit_lvvit_medium": (224, 20, (10, 14, 17)),
    "sit_lvvit_large": (288, 24, (10, 14, 17)),
}


@pytest.mark.parametrize("name", list(LVVIT))
def test_lvvit_variants_token_counts_follow_the_spec_table(name):
    img, depth, after = LVVIT[name]
    model = timm.create_model(name, num_classes=10).eval()
    n0 = (img // 16) ** 2
    stages = [n0, n0 // 2, n0 // 4, n0 // 8]  # int(N0 * 0.5^i): 196 -> 98 -> 49 -> 24 at 224
    expected, stage = [], 0
    for block in range(1, depth + 1):
        expected.append(stages[stage] + 1)
        if stage < 3 and block == after[stage]:
            stage += 1
    seen, out = entering_tokens(model, torch.randn(1, 3, img, img))
    assert seen == expected
    assert out.shape == (1, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(n for n in timm.list_models(["sit_*", "lvvit_*"])))
def test_every_registered_name_builds_and_runs_on_a_small_input(name):
    model = timm.create_model(name, img_size=64, num_classes=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
