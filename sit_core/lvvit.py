"""LV-ViT as SiT uses it (docs/method.md "Backbones"), built on timm's VisionTransformer, not forked.

Two pieces differ from timm's ViT and both plug into VisionTransformer's own hooks:
  * `LVViTBlock` (`block_fn`): residual branches divided by a constant `skip_lam`;
  * `ConvStem` (`embed_layer`): 3x3 conv/BN/GELU stack instead of one 16x16 projection.
Teachers register as timm models `lvvit_{tiny,small,medium,large}` (import this module first).
SiT students are `build_lvvit(...)` plus the slimming patch, placed by `sit_core.schedule.PAPER_SCHEDULES`
(rows `sit_lvvit_{tiny,xsmall,small,medium,large}`).

    import sit_core.lvvit, timm
    model = timm.create_model('lvvit_small', pretrained=True, num_classes=1000,
                              pretrained_cfg_overlay=dict(file='/path/lvvit_small.pth'))
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, PatchEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn


__all__ = [
    'LVViTVariant', 'LVVIT_VARIANTS',
    'LVViTBlock', 'ConvStem', 'checkpoint_filter_fn', 'build_lvvit',
]


@dataclass(frozen=True)
class LVViTVariant:
    """One LV-ViT backbone row of the table in docs/method.md (head_dim = embed_dim // num_heads = 64)."""

    embed_dim: int
    depth: int
    num_heads: int
    skip_lam: float         # each residual branch is divided by this
    stem: str               # '4c' or '6c', see STEM_LAYOUTS
    img_size: int           # native input resolution
    mlp_ratio: float = 3.0


LVVIT_VARIANTS: Dict[str, LVViTVariant] = {
    'tiny': LVViTVariant(embed_dim=320, depth=14, num_heads=5, skip_lam=2.0, stem='4c', img_size=224),
    'small': LVViTVariant(embed_dim=384, depth=16, num_heads=6, skip_lam=2.0, stem='4c', img_size=224),
    'medium': LVViTVariant(embed_dim=512, depth=20, num_heads=8, skip_lam=2.0, stem='4c', img_size=224),
    'large': LVViTVariant(embed_dim=768, depth=24, num_heads=12, skip_lam=3.0, stem='6c', img_size=288),
}


# (divisor of C giving the output channels, stride) of each 3x3 conv; strides multiply to 16.
# 6c follows the SiT reference's channels C/8, C/8, C/8, C/4, C/2, C (widen only when downsampling).
STEM_LAYOUTS: Dict[str, Tuple[Tuple[int, int], ...]] = {
    '4c': ((8, 2), (4, 2), (2, 2), (1, 2)),
    '6c': ((8, 2), (8, 1), (8, 1), (4, 2), (2, 2), (1, 2)),
}


class LVViTBlock(Block):
    """timm's pre-norm Block with residual branches divided by a constant `skip_lam`.

    Modifications to timm's Block:
      - forward: x + branch(x) / skip_lam, for the attention and the MLP branch, written as two halves
        (`attn_residual`, `mlp_residual`) so in-block token reducers can cut between them.
    Everything else (norm1/attn/norm2/mlp, timm's Attention and its qkv Linear, ls*, drop_path*)
    is timm's, so state dicts and hooks on `block.attn.qkv` look the same as on a timm ViT.
    """

    def __init__(self, dim: int, num_heads: int, skip_lam: float = 1.0, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.skip_lam = skip_lam

    def forward(self, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        # attn_kwargs: attn_mask / is_causal, whatever this timm's VisionTransformer passes on.
        return self.mlp_residual(self.attn_residual(x, **attn_kwargs))

    # The two residual halves, so token reducers that work between attention and MLP (EViT, ToMe)
    # can cut this block where they cut timm's (sit_core.patch.BlockHalves).
    def attn_residual(self, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        return x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **attn_kwargs))) / self.skip_lam

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) / self.skip_lam

    def extra_repr(self) -> str:
        return f'skip_lam={self.skip_lam}'


class ConvStem(PatchEmbed):
    """LV-ViT convolutional stem, a drop-in `embed_layer` for timm's VisionTransformer.

    Modifications to timm's PatchEmbed:
      - `proj` is a stack of 3x3 conv -> BN (-> GELU on all but the last) whose strides multiply
        to patch_size (16), so grid_size, num_patches, feat_ratio(), dynamic_feat_size(), the size
        checks, flattening to (B, N, C) and output_fmt all keep PatchEmbed's meaning;
      - the patch size is fixed by the stem and cannot be changed by set_input_size().
    Layers are named conv{i}/bn{i} like the SiT reference, so its checkpoints map one to one.
    """

    def __init__(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            stem: str = '4c',
            **kwargs: Any,
    ) -> None:
        layout = STEM_LAYOUTS[stem]
        stride = math.prod(s for _, s in layout)
        if to_2tuple(patch_size) != (stride, stride):
            raise ValueError(f"the '{stem}' stem downsamples {stride}x, got patch_size={patch_size}")
        # PatchEmbed builds a throwaway 16x16 proj here; reusing its init keeps every attribute it sets.
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        dd = {k: kwargs[k] for k in ('device', 'dtype') if k in kwargs}  # newer timm passes these
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = in_chans
        for i, (div, s) in enumerate(layout, start=1):
            c_out = embed_dim // div
            # no conv bias: BN follows (as in the reference); the `bias` arg is for a bare projection
            layers[f'conv{i}'] = nn.Conv2d(c_in, c_out, kernel_size=3, stride=s, padding=1, bias=False, **dd)
            layers[f'bn{i}'] = nn.BatchNorm2d(c_out, **dd)
            if i < len(layout):
                layers[f'act{i}'] = nn.GELU()
            c_in = c_out
        self.proj = nn.Sequential(layers)
        self.stem = stem

    def set_input_size(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            patch_size: Optional[Union[int, Tuple[int, int]]] = None,
    ) -> None:
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError(f'the conv stem fixes patch_size at {self.patch_size}')
        super().set_input_size(img_size=img_size)


# Reference (TokenLabeling / SiT) keys this model does not have: the token-labeling aux head and
# the training-only RTSMs. Dropped only when the model lacks them; anything else must match.
_REFERENCE_ONLY = ('aux_head.', 'rtsm.')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionTransformer) -> Dict[str, torch.Tensor]:
    """timm's ViT filter (unwraps 'model'/'state_dict', resamples pos_embed) + the reference layout."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r'^patch_embed\.((conv|bn)\d+\.)', r'patch_embed.proj.\1', k)  # reference stem names
        if k not in own and k.startswith(_REFERENCE_ONLY):
            continue
        out[k] = v
    return vit_checkpoint_filter_fn(out, model)


def build_lvvit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Build the LV-ViT `variant` (a key of LVVIT_VARIANTS) with timm's build_model_with_cfg.

    kwargs override the table and VisionTransformer's arguments as for any timm model (num_classes,
    img_size, in_chans, drop_path_rate, depth, ...), plus `skip_lam` and `stem`. Weights come only from
    a local file: pretrained=True, pretrained_cfg_overlay=dict(file=path) (the cfgs carry no url/hub id).
    """
    if variant not in LVVIT_VARIANTS:
        raise KeyError(f'unknown LV-ViT variant {variant!r}, expected one of {sorted(LVVIT_VARIANTS)}')
    v = LVVIT_VARIANTS[variant]
    skip_lam = kwargs.pop('skip_lam', v.skip_lam)
    stem = kwargs.pop('stem', v.stem)
    model_args = dict(
        img_size=v.img_size, patch_size=16, embed_dim=v.embed_dim, depth=v.depth, num_heads=v.num_heads,
        mlp_ratio=v.mlp_ratio, qkv_bias=False, class_token=True, global_pool='token',
        norm_layer=partial(LayerNorm, eps=1e-5),  # the reference uses nn.LayerNorm's eps, timm ViT 1e-6
        embed_layer=partial(ConvStem, stem=stem),
        block_fn=partial(LVViTBlock, skip_lam=skip_lam),
    )
    return build_model_with_cfg(
        VisionTransformer,
        f'lvvit_{variant}',
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls='getter'),
        **dict(model_args, **kwargs),
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '',  # no hub: weights only ever come from pretrained_cfg_overlay=dict(file=...)
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None, 'fixed_input_size': True,
        'crop_pct': 0.9, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj.conv1', 'classifier': 'head',
        'paper_ids': 'arXiv:2104.10858', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'lvvit_tiny': _cfg(),
    'lvvit_small': _cfg(),
    'lvvit_medium': _cfg(crop_pct=1.0),  # the reference evaluates M and L uncropped
    'lvvit_large': _cfg(input_size=(3, 288, 288), crop_pct=1.0),
})


@register_model
def lvvit_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """LV-ViT-T (SiT-T teacher): dim 320, depth 14, 5 heads, skip_lam 2, 4c stem, 224 px."""
    return build_lvvit('tiny', pretrained=pretrained, **kwargs)


@register_model
def lvvit_small(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """LV-ViT-S (SiT-XS and SiT-S teacher): dim 384, depth 16, 6 heads, skip_lam 2, 4c stem, 224 px."""
    return build_lvvit('small', pretrained=pretrained, **kwargs)


@register_model
def lvvit_medium(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """LV-ViT-M (SiT-M teacher): dim 512, depth 20, 8 heads, skip_lam 2, 4c stem, 224 px."""
    return build_lvvit('medium', pretrained=pretrained, **kwargs)


@register_model
def lvvit_large(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """LV-ViT-L (SiT-L teacher): dim 768, depth 24, 12 heads, skip_lam 3, 6c stem, 288 px."""
    return build_lvvit('large', pretrained=pretrained, **kwargs)
