"""The registered models: token counts, class-token bypass, reducers, timm conventions."""
import pytest
import timm
import torch

import sit_core
from sit_core.peers import AttentionStats, BipartiteMerge, TokenSizes, TopKDrop
from sit_core.slimming import ReverseTokenSlimming, TokenSlimming

DEIT = ["sit_deit_tiny", "sit_deit_small", "sit_deit_base"]
REGISTERED = sorted(timm.list_models(["sit_*", "lvvit_*"]))
SMALL = dict(img_size=64, embed_dim=64, num_heads=2)  # keeps every registered depth (and schedule), shrinks the rest


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


def test_tome_r_merges_r_tokens_in_every_block():
    model = timm.create_model("sit_deit_tiny", schedule="merge:r5", img_size=96, num_classes=5).eval()
    seen, _ = entering_tokens(model, torch.randn(2, 3, 96, 96))
    # 36 patches, min(5, n // 2) merged per block: 36 31 26 21 16 11 6 3 2 1 1 1 (+ class token)
    assert seen == [37, 32, 27, 22, 17, 12, 7, 4, 3, 2, 2, 2]
    assert model.slim_tokens == [s - 1 for s in seen]


def test_drop_with_fusion_keeps_the_count():
    model = timm.create_model("sit_deit_tiny", reducer="drop", fuse_dropped=True, img_size=96).eval()
    seen, _ = entering_tokens(model, torch.randn(2, 3, 96, 96))
    assert seen == [37] * 3 + [26] * 3 + [18] * 3 + [13] * 3


def test_in_block_reducers_cut_between_attention_and_mlp():
    """TSM: the whole block sees n_in. Drop/merge: attention sees n_in, the MLP already n_out."""
    for reducer, attn_n, mlp_n in (("tsm", 17, 17), ("drop", 17, 12), ("merge", 17, 12)):
        model = timm.create_model("sit_deit_tiny", reducer=reducer, img_size=64).eval()
        block, seen = model.blocks[2], {}  # block 3 reduces 16 -> 11 patch tokens
        block.attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn", a[0].shape[1]))
        block.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp", a[0].shape[1]))
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
        assert (seen["attn"], seen["mlp"]) == (attn_n, mlp_n), reducer


@pytest.mark.parametrize("reducer", ["tsm", "drop", "merge"])
def test_class_token_bypasses_reducers(reducer):
    model = timm.create_model("sit_deit_tiny", reducer=reducer, img_size=64).eval()
    block = model.blocks[2]
    seen = []
    block.slim.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
    with torch.no_grad():
        out = block(torch.randn(2, 17, model.embed_dim))
    assert out.shape[1] == 1 + 11
    entering, leaving = seen[0]
    torch.testing.assert_close(leaving[:, 0], entering[:, 0])  # class token passes through unchanged
    if reducer == "tsm":  # and the class token's value cannot influence the slimmed patch tokens
        shifted = entering.clone()
        shifted[:, 0] += 100.0
        torch.testing.assert_close(block.slim(shifted)[:, 1:], leaving[:, 1:])


@pytest.mark.parametrize("schedule", ["tsm:3,6,9@0.7", "drop:3,6,9@0.7+fuse", "merge:3,6,9@0.7", "merge:r4"])
def test_every_block_runs_alone_with_the_scheduled_counts(schedule):
    """The latency model's contract: block(x), (B, P + n_in, C) -> (B, P + n_out, C)."""
    model = timm.create_model("sit_deit_tiny", schedule=schedule, img_size=64).eval()
    n_in, n_out = sit_core.tokens_per_block(model), sit_core.patch.tokens_leaving_block(model)
    for block, a, b in zip(model.blocks, n_in, n_out):
        with torch.no_grad():
            assert block(torch.randn(2, 1 + a, model.embed_dim)).shape == (2, 1 + b, model.embed_dim)


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
    plain = timm.create_model("deit_tiny_patch16_224", img_size=64)
    for reducer, cls in (("drop", TopKDrop), ("merge", BipartiteMerge)):
        model = timm.create_model("sit_deit_tiny", reducer=reducer, img_size=64)
        assert any(isinstance(m, cls) for m in model.modules())
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
        assert model.state_dict().keys() == plain.state_dict().keys()


def test_timm_kwargs_override_schedule_and_shape():
    model = timm.create_model("sit_deit_tiny", positions=(2, 4), keep=0.5, img_size=128, in_chans=1, num_classes=7)
    assert model.slim_schedule.positions == (2, 4)
    assert model.slim_tokens[:5] == [64, 64, 32, 32, 16]
    assert model(torch.randn(1, 1, 128, 128)).shape == (1, 7)
    with pytest.raises(ValueError, match="valid positions are 1..11"):
        timm.create_model("sit_deit_tiny", positions=(3, 12))
    assert timm.create_model("sit_deit_tiny", r=3, img_size=64).slim_schedule == sit_core.SlimSchedule.parse("merge:r3")


def test_drop_path_rate_reaches_the_student():
    model = timm.create_model("sit_lvvit_tiny", drop_path_rate=0.1, img_size=64, embed_dim=64, num_heads=2)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)  # timm's linear rule
    assert hasattr(model.blocks[0], "slim")  # a slimming block keeps its stochastic depth


# --- the peers against hand computations --------------------------------------------------------

def test_merge_averages_by_size():
    # Two identical-key tokens merged: result is their size-weighted mean.
    merge = BipartiteMerge(in_tokens=4, out_tokens=3, num_prefix=0)
    x = torch.tensor([[[0.0], [10.0], [5.0], [7.0]]])
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    out, size = merge(x, keys, None)
    assert out.shape == (1, 3, 1)
    assert sorted(out.flatten().tolist()) == [5.0, 5.0, 7.0]  # 0 and 10 merged into 5
    assert sorted(size.flatten().tolist()) == [1.0, 1.0, 2.0]
    out, size = merge(x, keys, torch.tensor([[[3.0], [1.0], [1.0], [1.0]]]))  # a token of size 3 weighs 3
    assert 2.5 in out.flatten().tolist() and 4.0 in size.flatten().tolist()  # (0 * 3 + 10 * 1) / 4


def test_drop_keeps_the_most_attended_tokens_and_fuses_by_raw_attention():
    x = torch.arange(4.0).view(1, 4, 1)
    attn = torch.tensor([[0.1, 0.5, 0.05, 0.35]])
    assert TopKDrop(in_tokens=4, out_tokens=2)(x, attn).flatten().tolist() == [1.0, 3.0]
    fused = TopKDrop(in_tokens=4, out_tokens=2, fuse=True)(x, attn).flatten().tolist()
    # EViT: keep 1, fuse the rest as sum(attention * token), the attention NOT renormalised
    assert fused == pytest.approx([1.0, 0.35 * 3 + 0.1 * 0 + 0.05 * 2])


def test_attention_stats_read_the_blocks_own_class_attention():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1, qk_norm=True).eval()
    attn = model.blocks[0].attn
    stats = AttentionStats(attn)
    x = torch.randn(2, 17, model.embed_dim)
    with torch.no_grad():
        attn(x)
        q, k, _ = attn.qkv(x).reshape(2, 17, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        weights = (attn.q_norm(q) @ attn.k_norm(k).transpose(-2, -1) * attn.scale).softmax(-1)  # (B, H, N, N)
    torch.testing.assert_close(stats.cls_attention(1), weights[:, :, 0, 1:].mean(1))
    torch.testing.assert_close(stats.patch_keys(1), attn.k_norm(k)[:, :, 1:].mean(1))


@pytest.mark.parametrize("fused", [True, False])
def test_proportional_attention_a_size_2_token_equals_two_identical_tokens(fused):
    torch.manual_seed(0)
    attn = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).blocks[0].attn.eval()
    attn.fused_attn = fused
    cls, a, b = torch.randn(3, 1, 1, 192).unbind(0)
    merged, duplicated = torch.cat([cls, a, b], 1), torch.cat([cls, a, a, b], 1)
    sizes = TokenSizes()
    with torch.no_grad(), sizes.session():
        sizes.update(torch.tensor([[[2.0], [1.0]]]))  # patch tokens a (holds 2) and b
        bias = sizes.attn_bias(merged)
        out = attn(merged, attn_mask=bias)
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([0.0, 2.0, 1.0]).log().nan_to_num(neginf=0.0))
    with torch.no_grad():
        ref = attn(duplicated)
    torch.testing.assert_close(out, ref[:, [0, 1, 3]], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and without the bias it would differ: the test can fail
        assert not torch.allclose(attn(merged), ref[:, [0, 1, 3]], atol=1e-4)


def test_token_sizes_persist_across_merges_of_one_forward_and_only_that_forward():
    model = timm.create_model("sit_deit_tiny", schedule="merge:2,4@0.5", img_size=64).eval()
    masks = {}
    for i in (3, 11):
        model.blocks[i].attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: masks.__setitem__(i, kw["attn_mask"]), with_kwargs=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    for i, n in ((3, 8), (11, 4)):  # after the 1st merge (16 -> 8), after the 2nd (8 -> 4)
        sizes = masks[i][:, 0, 0, 1:].exp()
        assert sizes.shape == (2, n)
        torch.testing.assert_close(sizes.sum(-1), torch.full((2,), 16.0))  # every patch is held by one token
        assert masks[i][:, 0, 0, 0].abs().max() == 0  # the class token has size 1
    assert masks[11].max() > masks[3].max()  # sizes grew across the two merge points
    # proportional attention from the block after the first merge on; the merging block itself has none yet
    assert hasattr(model.blocks[1], "slim") and not hasattr(model.blocks[1], "token_sizes")
    assert hasattr(model.blocks[2], "token_sizes") and not hasattr(model.blocks[0], "slim")
    with torch.no_grad():  # a block called alone: every token has size 1
        model.blocks[11](torch.randn(2, 5, model.embed_dim))
    assert masks[11].abs().max() == 0 and model.token_sizes.size is None


# --- timm conventions -----------------------------------------------------------------------------

LVVIT = {  # table in docs/method.md: name -> (img_size, depth, TSM after blocks)
    "sit_lvvit_tiny": (224, 14, (1, 2, 3)),
    "sit_lvvit_xsmall": (224, 16, (1, 2, 3)),
    "sit_lvvit_small": (224, 16, (9, 12, 14)),
    "sit_lvvit_medium": (224, 20, (10, 14, 17)),
    "sit_lvvit_large": (288, 24, (10, 14, 17)),
}


@pytest.mark.parametrize("name", list(LVVIT))
def test_lvvit_variants_token_counts_follow_the_spec_table(name):
    img, depth, after = LVVIT[name]
    model = timm.create_model(name, num_classes=10, embed_dim=64, num_heads=1).eval()  # real input size and depth
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


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_name_builds_runs_and_trains_on_a_small_input(name):
    model = timm.create_model(name, num_classes=4, **SMALL).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    out.sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", REGISTERED)
def test_features_only(name):
    """timm's test_model_forward_features / _intermediates_features checks on our registry: NCHW maps
    on the patch grid (reduction = patch size), slimmed or not, finite, with gradients to the TSMs."""
    model = timm.create_model(name, pretrained=False, features_only=True, **SMALL).eval()
    expected_channels, expected_reduction = model.feature_info.channels(), model.feature_info.reduction()
    assert len(expected_channels) >= 3
    assert str(model.output_fmt.value) == "NCHW"
    outputs = model(torch.randn(1, 3, 64, 64))
    assert len(outputs) == len(expected_channels)
    for e, r, o in zip(expected_channels, expected_reduction, outputs):
        assert o.shape == (1, e, 64 // r, 64 // r) and not torch.isnan(o).any()
    if name.startswith("sit_"):
        sum(o.sum() for o in outputs).backward()
        tsm = [p for n, p in model.named_parameters() if ".slim." in n and "score" in n]
        assert tsm and all(p.grad is not None for p in tsm)
    with pytest.raises(ValueError, match="feature_cls='getter'"):
        timm.create_model("sit_deit_tiny", features_only=True, feature_cls="hook", **SMALL)


@pytest.mark.parametrize("reducer", ["drop", "merge"])
def test_features_spread_each_token_over_the_positions_it_holds(reducer):
    """Hard reducers make the mapping checkable: after a merge every position shows its group's token;
    after a drop the kept tokens sit at one position each and the dropped positions read zero."""
    model = timm.create_model("sit_deit_tiny", reducer=reducer, keep=0.5, features_only=True, out_indices=(2, 3, 5),
                              **SMALL).eval()
    inner = model.model
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        grids = model(x)
        tokens = inner.forward_intermediates(x, indices=(2, 3, 5), output_fmt="NLC", intermediates_only=True)
    leaving = sit_core.patch.tokens_leaving_block(inner)
    for i, grid, tok in zip((2, 3, 5), grids, tokens):
        cells = grid.flatten(2).transpose(1, 2)                       # (B, 16, C)
        for b in range(2):
            distinct = torch.unique(cells[b][cells[b].abs().sum(-1) > 0], dim=0)
            assert len(distinct) == leaving[i] == tok.shape[1]
            # every non-zero cell is one of the block's tokens (the same vectors, up to float error)
            assert torch.cdist(distinct, tok[b]).min(dim=1).values.max() < 1e-4
            zero = (cells[b].abs().sum(-1) == 0).sum().item()
            assert zero == (16 - leaving[i] if reducer == "drop" else 0)


def test_a_merging_model_refuses_gradient_checkpointing():
    model = timm.create_model("sit_deit_tiny", schedule="merge:r2", img_size=32)
    with pytest.raises(ValueError, match="cannot use gradient checkpointing"):
        model.set_grad_checkpointing(True)
    timm.create_model("sit_deit_tiny", img_size=32).set_grad_checkpointing(True)  # a TSM model can
