"""LV-ViT backbone (sit_core.lvvit): registry, architecture of docs/method.md, stem, skip_lam, local weights."""
import pytest
import timm
import torch
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from sit_core.lvvit import (
    LVVIT_VARIANTS, STEM_LAYOUTS, ConvStem, LVViTBlock, build_lvvit,
)
from sit_core.schedule import PAPER_SCHEDULES, SIT_LVVIT_VARIANTS

TEACHERS = [f'lvvit_{v}' for v in LVVIT_VARIANTS]
# Published sizes (with the token-labeling aux head we drop); ours must land within 5%.
REFERENCE_PARAMS_M = {'small': 26.0, 'medium': 56.0, 'large': 150.0}


def test_registered_names_are_ours():
    assert sorted(timm.list_models('lvvit*')) == sorted(TEACHERS)
    for name in TEACHERS:
        assert timm.models.model_entrypoint(name).__module__ == 'sit_core.lvvit'
        assert not timm.models.is_model_pretrained(name)  # nothing to download, ever


@pytest.mark.parametrize('name', TEACHERS)
def test_teacher_builds_and_runs(name):
    model = timm.create_model(name, num_classes=10, img_size=64)
    assert isinstance(model, VisionTransformer)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_every_parameter_gets_a_gradient():
    model = timm.create_model('lvvit_tiny', num_classes=10, img_size=64, depth=2, drop_path_rate=0.1)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize('variant', list(LVVIT_VARIANTS))
def test_architecture_matches_spec(variant):
    v = LVVIT_VARIANTS[variant]
    model = timm.create_model(f'lvvit_{variant}', device='meta')  # shapes only, no init cost
    dim = v.embed_dim
    assert len(model.blocks) == v.depth and model.num_prefix_tokens == 1 and model.global_pool == 'token'
    for blk in model.blocks:
        assert isinstance(blk, LVViTBlock) and isinstance(blk, Block) and blk.skip_lam == v.skip_lam
        assert isinstance(blk.attn, Attention) and blk.attn.qkv.bias is None
        assert blk.attn.num_heads == v.num_heads and blk.attn.head_dim == 64
        assert blk.mlp.fc1.out_features == 3 * dim
    # stem: 3x3 convs, channels/strides as STEM_LAYOUTS, BN after each, GELU after all but the last
    convs = [m for m in model.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    layout = STEM_LAYOUTS[v.stem]
    assert [(c.out_channels, c.stride[0], c.kernel_size) for c in convs] == [(dim // d, s, (3, 3)) for d, s in layout]
    kinds = [type(m).__name__ for m in model.patch_embed.proj]
    assert kinds.count('BatchNorm2d') == len(layout) and kinds.count('GELU') == len(layout) - 1
    assert kinds[-1] == 'BatchNorm2d'
    n = (v.img_size // 16) ** 2
    assert model.patch_embed.num_patches == n and model.pos_embed.shape == (1, n + 1, dim)
    assert model.pretrained_cfg['input_size'] == (3, v.img_size, v.img_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f'lvvit_{variant} @ {v.img_size}px, 1000 classes: {n_params / 1e6:.2f}M params')
    if variant in REFERENCE_PARAMS_M:
        assert n_params / 1e6 == pytest.approx(REFERENCE_PARAMS_M[variant], rel=0.05)


@pytest.mark.parametrize('stem,img_size,tokens', [('4c', 224, 196), ('6c', 288, 324), ('4c', 64, 16)])
def test_stem_downsamples_16x(stem, img_size, tokens):
    embed = ConvStem(img_size=img_size, embed_dim=64, stem=stem).eval()
    assert embed.num_patches == tokens and embed.feat_ratio() == 16
    assert embed(torch.randn(1, 3, img_size, img_size)).shape == (1, tokens, 64)
    with pytest.raises(ValueError):
        ConvStem(img_size=img_size, patch_size=8, embed_dim=64, stem=stem)


def test_skip_lam_divides_residual_branches():
    torch.manual_seed(0)
    blk = LVViTBlock(dim=64, num_heads=1, mlp_ratio=3.0, skip_lam=2.0).eval()
    x = torch.randn(2, 5, 64)
    y = x + blk.attn(blk.norm1(x)) / 2.0
    expected = y + blk.mlp(blk.norm2(y)) / 2.0
    torch.testing.assert_close(blk(x), expected)
    # skip_lam=1 is exactly timm's Block
    plain = Block(dim=64, num_heads=1, mlp_ratio=3.0).eval()
    plain.load_state_dict(blk.state_dict())
    blk.skip_lam = 1.0
    torch.testing.assert_close(blk(x), plain(x))


def test_sit_rows_fit_their_teachers():
    for v in SIT_LVVIT_VARIANTS:
        row = PAPER_SCHEDULES[f'sit_lvvit_{v}']
        teacher = LVVIT_VARIANTS[row.backbone.removeprefix('lvvit_')]
        assert row.depth == teacher.depth
        row.schedule.validate_for(teacher.depth, (teacher.img_size // 16) ** 2)
    # the table in docs/method.md: teacher and TSM positions of every student, keep 0.5 each
    spec = {'tiny': ('lvvit_tiny', (1, 2, 3)), 'xsmall': ('lvvit_small', (1, 2, 3)),
            'small': ('lvvit_small', (9, 12, 14)), 'medium': ('lvvit_medium', (10, 14, 17)),
            'large': ('lvvit_large', (10, 14, 17))}
    rows = {v: PAPER_SCHEDULES[f'sit_lvvit_{v}'] for v in SIT_LVVIT_VARIANTS}
    assert {v: (r.backbone, r.schedule.positions) for v, r in rows.items()} == spec
    assert {k for r in rows.values() for k in r.schedule.keep} == {0.5}


def test_block_halves_compose_to_forward():
    torch.manual_seed(0)
    blk = LVViTBlock(dim=64, num_heads=1, mlp_ratio=3.0, skip_lam=3.0).eval()
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(blk.mlp_residual(blk.attn_residual(x)), blk(x))


def test_pretrained_loads_local_file_only(tmp_path):
    kw = dict(num_classes=10, img_size=64, depth=2)  # depth only saves time, the path is the same
    src = build_lvvit('tiny', **kw).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = src(x)
    path = tmp_path / 'lvvit_tiny.pth'
    torch.save(src.state_dict(), path)
    model = timm.create_model(
        'lvvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **kw).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)

    # the SiT / TokenLabeling layout: wrapped in 'model', stem as patch_embed.conv1, extra aux_head
    ref_sd = {k.replace('patch_embed.proj.', 'patch_embed.'): v for k, v in src.state_dict().items()}
    ref_sd.update({'aux_head.weight': torch.zeros(10, 320), 'aux_head.bias': torch.zeros(10)})
    torch.save({'model': ref_sd}, path)
    model = timm.create_model(
        'lvvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **kw).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)

    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('lvvit_tiny', pretrained=True, **kw)  # no file: refuse, never download


def test_dynamic_img_size():
    model = timm.create_model('lvvit_tiny', num_classes=10, img_size=64, depth=2, dynamic_img_size=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 128)).shape == (1, 10)
