"""Arm any timm VisionTransformer with token reducers by patching, not forking (as ToMe does).

`apply_slimming(model, schedule)` attaches a `SlimPoint` to each scheduled block and swaps the
block's class for a subclass that runs it on the block's output. State-dict keys of the backbone
are unchanged (`blocks.3.norm1.weight`...), the reducers appear as `blocks.<i>.slim.*`, so a plain
ViT checkpoint loads into a slimmed model with only the reducers missing.
"""
from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from .peers import AttentionStats, BipartiteMerge, MergeState, TopKDrop
from .schedule import ScheduleLike, SlimSchedule, as_schedule
from .slimming import TokenSlimming


class SlimPoint(nn.Module):
    """Reduces the patch tokens leaving one block; prefix tokens (class, register) bypass it."""

    def __init__(self, reducer: nn.Module, num_prefix_tokens: int, attn: nn.Module | None = None):
        super().__init__()
        self.reducer, self.num_prefix_tokens = reducer, num_prefix_tokens
        # Plain attribute, not a submodule: the stats hook reads the block's own attention.
        self._stats = AttentionStats(attn) if attn is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        prefix, patches = x[:, :p], x[:, p:]
        if isinstance(self.reducer, TopKDrop):
            patches = self.reducer(patches, self._stats.cls_attention(p))
        elif isinstance(self.reducer, BipartiteMerge):
            patches = self.reducer(patches, self._stats.patch_keys(p))
        else:
            patches = self.reducer(patches)
        return torch.cat([prefix, patches], dim=1)


_SLIM_CLASSES: dict[type, type] = {}


def _slim_block_class(block_cls: type) -> type:
    """A subclass of `block_cls` whose forward ends with `self.slim` (cached: one per base class)."""
    if block_cls not in _SLIM_CLASSES:

        class SlimBlock(block_cls):
            """Modifications: the output goes through `self.slim` (a SlimPoint) before it leaves."""

            def forward(self, x, *args, **kwargs):
                return self.slim(super().forward(x, *args, **kwargs))

        SlimBlock.__name__ = SlimBlock.__qualname__ = f"Slim{block_cls.__name__}"
        _SLIM_CLASSES[block_cls] = SlimBlock
    return _SLIM_CLASSES[block_cls]


def model_geometry(model: nn.Module) -> tuple[int, int, int, int]:
    """(depth, num_patches, num_prefix_tokens, embed_dim) of a timm VisionTransformer-like model."""
    missing = [a for a in ("blocks", "patch_embed", "num_prefix_tokens", "embed_dim") if not hasattr(model, a)]
    if missing:
        raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer (lacks {', '.join(missing)})")
    return len(model.blocks), model.patch_embed.num_patches, model.num_prefix_tokens, model.embed_dim


def apply_slimming(model: nn.Module, schedule: ScheduleLike = None, **overrides) -> nn.Module:
    """Patch `model` in place with the reducers of `schedule`; returns it for chaining."""
    schedule = as_schedule(schedule, **overrides)
    if getattr(model, "slim_schedule", None) is not None:
        raise ValueError(f"model is already slimmed with {model.slim_schedule}; build a fresh one")
    depth, num_patches, num_prefix, dim = model_geometry(model)
    if getattr(model, "dynamic_img_size", False) and not schedule.is_identity:
        raise ValueError("token slimming needs a fixed token count: build the model with dynamic_img_size=False")
    schedule.validate_for(depth, num_patches)
    if schedule.reducer == "drop" and getattr(model, "cls_token", None) is None:
        raise ValueError("reducer='drop' ranks tokens by class-token attention: the model has no class token")

    counts = schedule.stage_tokens(num_patches)
    merge_state = MergeState()
    for stage, pos in enumerate(schedule.positions):
        n_in, n_out = counts[stage], counts[stage + 1]
        block = model.blocks[pos - 1]
        attn = None
        if schedule.reducer == "tsm":
            reducer = TokenSlimming(dim, n_in, n_out)
            reducer.apply(_init_like_vit)
        elif schedule.reducer == "drop":
            reducer, attn = TopKDrop(n_in, n_out, fuse=schedule.fuse_dropped), block.attn
        else:
            reducer, attn = BipartiteMerge(n_in, n_out, merge_state, first=stage == 0), block.attn
        block.slim = SlimPoint(reducer, num_prefix, attn)
        block.__class__ = _slim_block_class(type(block))

    model.slim_schedule = schedule
    model.slim_tokens = schedule.block_tokens(depth, num_patches)  # patch tokens entering each block
    return model


def slim_schedule(model: nn.Module) -> SlimSchedule:
    """The schedule a model runs (reducer 'none' for a plain ViT)."""
    return getattr(model, "slim_schedule", None) or SlimSchedule(reducer="none")


def tokens_per_block(model: nn.Module) -> list[int]:
    """Patch tokens entering each block of `model`, slimmed or not."""
    depth, num_patches, _, _ = model_geometry(model)
    return slim_schedule(model).block_tokens(depth, num_patches)


def _init_like_vit(module: nn.Module) -> None:
    # The reference SiT and timm's ViT init every Linear this way; the TSM starts near-uniform.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
