"""TSM warm start: a warm-started TSM aggregates like a spatial pooling, a random one like a uniform mean."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed

import sit_core  # noqa: F401  (registers sit_*)
from sit_core.warm_start import aggregation_error, farthest_points, pooling_target, warm_start_tsms


def real_like_student(seed=0):
    """A small ViT whose tokens carry a smooth 2-D position embedding, as trained ViTs' do."""
    torch.manual_seed(seed)
    model = timm.create_model("sit_deit_tiny", img_size=112, embed_dim=96, depth=6, num_heads=3,
                              positions=(2, 4), keep=0.5, num_classes=10)
    with torch.no_grad():
        model.pos_embed[:, 1:] = build_sincos2d_pos_embed(model.patch_embed.grid_size, 96)
    return model


def smooth_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 7, 7, generator=g), size=112, mode="bicubic")


def test_warm_started_tsms_pool_far_closer_than_random_ones_on_held_out_images():
    model = real_like_student()
    random_tsms = [b.slim.reducer for b in model.blocks if hasattr(b, "slim")]
    held_out = smooth_images(16, seed=2)

    def errors():  # distance to the intended pooling on images the fit never saw
        reports = []
        for i, tsm in zip((2, 4), random_tsms):
            seen = {}
            h = tsm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
            with torch.no_grad():
                model.forward_features(held_out)
            h.remove()
            reports.append(seen["x"])
        return reports

    x1 = errors()[0]
    grid = torch.stack(torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij"), -1).flatten(0, 1)
    target, _ = pooling_target(grid.expand(16, -1, -1), 24, 49.0)
    with torch.no_grad():
        before = aggregation_error(random_tsms[0].weights(x1), target)
    reports = warm_start_tsms(model, smooth_images(32, seed=1))
    assert [(r.block, r.tokens) for r in reports] == [(2, (49, 24)), (4, (24, 12))]
    x1 = errors()[0]
    with torch.no_grad():
        after = aggregation_error(random_tsms[0].weights(x1), target)
    assert before > 0.8  # random init: about the uniform mean of all 49 tokens
    assert after < 0.6 * before
    assert all(r.error_after < 0.6 * r.error_before for r in reports)  # the second TSM too (on its fitting batch)
    assert model.training  # mode restored


def test_pooling_target_is_a_convex_pooling_around_spread_centres():
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).flatten(0, 1)
    idx = farthest_points(grid, 4)
    assert sorted(map(tuple, grid[idx].tolist())) == [(0.0, 0.0), (0.0, 3.0), (3.0, 0.0), (3.0, 3.0)]
    logits, sigma = pooling_target(grid.expand(2, -1, -1), 4, 16.0)
    w = logits.softmax(dim=1)
    torch.testing.assert_close(w.sum(1), torch.ones(2, 4))
    assert sigma == pytest.approx((16 / 4 / (2 * torch.pi)) ** 0.5)
    assert w[0, 0, :].argmax() == (idx == 0).nonzero()[0, 0]  # token (0, 0) is pooled by the slot centred on it


def test_a_model_without_tsms_is_left_alone():
    model = timm.create_model("sit_deit_tiny", img_size=32, reducer="drop", num_classes=3)
    assert warm_start_tsms(model, torch.randn(2, 3, 32, 32)) == []
