"""Arm a timm VisionTransformer with token reducers by patching, not forking (as ToMe does).

`apply_slimming(model, schedule)` attaches a `SlimPoint` to each reducing block and swaps the
block's class for a cached subclass:
  * TSM (SiT): the reducer runs on the block's output (`block -> TSM`);
  * drop (EViT) / merge (ToMe): the block is cut between its attention and its MLP and the reducer
    runs there, as in those papers. Blocks after a merge add log(token size) to their attention
    logits (proportional attention), and the model's forward opens a token-size session.
State-dict keys of the backbone are unchanged (`blocks.3.norm1.weight`...), reducers appear as
`blocks.<i>.slim.*`, so a plain ViT checkpoint loads into a slimmed model with only the TSMs missing.
Every block keeps the contract `block(x)`: (B, P + n_in, C) -> (B, P + n_out, C).

Backbones this cannot serve are refused before anything changes, with one line saying why
(`check_slimmable`).
"""
from __future__ import annotations

import torch
from timm.layers import PatchDropout
from timm.models import Beit, Eva, FeatureDictNet, FeatureGraphNet, FeatureHookNet, VisionTransformerRelPos, VisionTransformerSAM
from timm.models._features import FeatureGetterNet  # in _features.__all__, not re-exported by timm.models 1.0.31
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from .peers import AttentionStats, BipartiteMerge, TokenSizes, TopKDrop
from .schedule import ScheduleLike, SlimSchedule, as_schedule
from .slimming import TokenSlimming

WORKING_FAMILIES = ("timm VisionTransformer (DeiT, DeiT-3, ViT, DINOv2 with registers, CLIP ViT, "
                    "global-average-pool ViTs, distilled DeiT) and the project's LV-ViT")
_FEATURE_WRAPPERS = (FeatureGetterNet, FeatureDictNet, FeatureHookNet, FeatureGraphNet)


class SlimPoint(nn.Module):
    """The token reducer of one block; prefix tokens (class, registers) bypass it."""

    def __init__(self, reducer: nn.Module, num_prefix_tokens: int, attn: nn.Module | None = None,
                 sizes: TokenSizes | None = None):
        super().__init__()
        self.reducer, self.num_prefix_tokens = reducer, num_prefix_tokens
        # Plain attributes, not submodules: the stats read the block's own attention, sizes are shared.
        self._stats = AttentionStats(attn) if attn is not None else None
        self._sizes = sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P + n_in, C) -> (B, P + n_out, C)
        p = self.num_prefix_tokens
        prefix, patches = x[:, :p], x[:, p:]
        if isinstance(self.reducer, TopKDrop):
            patches = self.reducer(patches, self._stats.cls_attention(p))
        elif isinstance(self.reducer, BipartiteMerge):
            patches, size = self.reducer(patches, self._stats.patch_keys(p), self._sizes.current())
            self._sizes.update(size)
        else:
            patches = self.reducer(patches)
        if self._stats is not None:
            self._stats.clear()
        return torch.cat([prefix, patches], dim=1)


class BlockHalves:
    """timm 1.0.31 `Block.forward` cut at the residual between attention and MLP (copied logic).

    A mixin placed AFTER the block class, so a block that defines its own halves (LV-ViT's
    `LVViTBlock`, with skip_lam) keeps them.
    """

    def attn_residual(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


_CLASSES: dict[tuple[str, type], type] = {}


def _cached_subclass(kind: str, base: type, make) -> type:
    if (kind, base) not in _CLASSES:
        cls = make(base)
        cls.__name__ = cls.__qualname__ = f"{kind}{base.__name__}"
        _CLASSES[(kind, base)] = cls
    return _CLASSES[(kind, base)]


def _after_block_class(block_cls: type) -> type:
    class SlimBlock(block_cls):
        """Modifications: the output goes through `self.slim` (a SlimPoint) before it leaves (SiT's TSM)."""

        def forward(self, x, *args, **kwargs):
            return self.slim(super().forward(x, *args, **kwargs))

    return _cached_subclass("Slim", block_cls, lambda _: SlimBlock)


def _in_block_class(block_cls: type) -> type:
    class ReducingBlock(block_cls, BlockHalves):
        """Modifications (as ToMe's ToMeBlock and EViT's Block):
         - `self.slim` (if any) reduces the tokens between the attention and the MLP residuals;
         - with `self.token_sizes` set (blocks after a merge), attention logits get + log(token size).
        """

        def forward(self, x, attn_mask=None, is_causal=False):
            if attn_mask is not None or is_causal:
                raise ValueError("a token-reducing block takes no attention mask: slimming needs fixed-size inputs")
            sizes = getattr(self, "token_sizes", None)
            x = self.attn_residual(x, attn_mask=sizes.attn_bias(x) if sizes is not None else None)
            slim = getattr(self, "slim", None)
            if slim is not None:
                x = slim(x)
            return self.mlp_residual(x)

    return _cached_subclass("Reducing", block_cls, lambda _: ReducingBlock)


def _merging_model_class(model_cls: type) -> type:
    def make(base):
        class MergingModel(base):
            """Modifications (as ToMe's ToMeVisionTransformer): each forward opens a token-size session,
            so sizes persist across the merge points of that forward and nowhere else."""

            def forward_features(self, *args, **kwargs):
                with self.token_sizes.session():
                    return super().forward_features(*args, **kwargs)

            def forward_intermediates(self, *args, **kwargs):
                with self.token_sizes.session():
                    return super().forward_intermediates(*args, **kwargs)

            def set_grad_checkpointing(self, enable: bool = True):
                if enable:
                    raise ValueError("a merging (ToMe) model cannot use gradient checkpointing: recomputing a block "
                                     "would merge again with the forward's final token sizes")
                super().set_grad_checkpointing(enable)

        return MergingModel

    return _cached_subclass("Merging", model_cls, make)


def model_geometry(model: nn.Module) -> tuple[int, int, int, int]:
    """(depth, num_patches, num_prefix_tokens, embed_dim) of a timm VisionTransformer-like model."""
    missing = [a for a in ("blocks", "patch_embed", "num_prefix_tokens", "embed_dim") if not hasattr(model, a)]
    if missing:
        raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer (lacks {', '.join(missing)})")
    return len(model.blocks), model.patch_embed.num_patches, model.num_prefix_tokens, model.embed_dim


def _splits_at_mlp(block: nn.Module) -> bool:
    """True if the block is timm's pre-norm Block (or defines its own halves, like LVViTBlock) around timm's Attention."""
    halves = type(block).forward is Block.forward or hasattr(type(block), "attn_residual")
    attn = getattr(block, "attn", None)
    return isinstance(block, Block) and halves and attn is not None and type(attn).forward is Attention.forward


def refusal(model: nn.Module, schedule: SlimSchedule) -> str | None:
    """Why `schedule` cannot be applied to `model` (one line), or None if it can. Looks at what the model is."""
    name = type(model).__name__
    works = f"; slimming works on {WORKING_FAMILIES}"
    if isinstance(model, _FEATURE_WRAPPERS):
        return (f"cannot slim {name}: it is a timm features_only wrapper around the model; slim the model first, "
                f"then wrap it (timm.create_model('sit_...', features_only=True) does both){works}")
    if isinstance(model, Eva):
        return (f"cannot slim {name}: EVA/EVA-02 and RoPE ViTs (timm Eva) apply per-block rotary position terms "
                f"built for the full token set{works}")
    if isinstance(model, (Beit, VisionTransformerRelPos, VisionTransformerSAM)):
        return (f"cannot slim {name}: its blocks add a relative position bias indexed by the full token grid "
                f"(BEiT, relpos ViT, SAM ViT){works}")
    if not isinstance(model, VisionTransformer):
        return f"cannot slim {name}: it is not a timm VisionTransformer{works}"
    if getattr(model, "slim_schedule", None) is not None:
        return f"model is already slimmed with {model.slim_schedule}; build a fresh one"
    if schedule.is_identity:
        return None
    if getattr(model, "dynamic_img_size", False):
        return "token slimming needs a fixed token count: build the model with dynamic_img_size=False"
    if isinstance(model.patch_drop, PatchDropout):
        return "token slimming needs a fixed token count: build the model with patch_drop_rate=0 (PatchDropout drops tokens at random)"
    if schedule.in_block:
        bad = next((b for b in model.blocks if not _splits_at_mlp(b)), None)
        if bad is not None:
            return (f"reducer '{schedule.reducer}' runs between a block's attention and its MLP: it needs timm's Block "
                    f"with timm's Attention (or LV-ViT's block), got {type(bad).__name__}")
    if schedule.reducer == "drop" and getattr(model, "cls_token", None) is None:
        return "reducer='drop' ranks tokens by class-token attention: the model has no class token"
    return None


def check_slimmable(model: nn.Module, schedule: ScheduleLike) -> None:
    """Raise ValueError (one line) if `schedule` cannot be applied to `model`."""
    why = refusal(model, as_schedule(schedule))
    if why:
        raise ValueError(why)


def apply_slimming(model: nn.Module, schedule: ScheduleLike = None, **overrides) -> nn.Module:
    """Patch `model` in place with the reducers of `schedule`; returns it for chaining."""
    schedule = as_schedule(schedule, **overrides)
    check_slimmable(model, schedule)
    depth, num_patches, num_prefix, dim = model_geometry(model)
    schedule.validate_for(depth, num_patches)

    n_in = schedule.block_tokens(depth, num_patches)
    n_out = schedule.block_out_tokens(depth, num_patches)
    reducing = schedule.reducing_blocks(depth)
    sizes = TokenSizes() if schedule.reducer == "merge" and reducing else None
    for i, block in enumerate(model.blocks, start=1):
        like = next(block.parameters())
        if schedule.reducer == "tsm" and i in reducing:
            block.slim = SlimPoint(TokenSlimming(dim, n_in[i - 1], n_out[i - 1]).to(like.device, like.dtype), num_prefix)
            block.__class__ = _after_block_class(type(block))
        elif schedule.reducer == "drop" and i in reducing:
            block.slim = SlimPoint(TopKDrop(n_in[i - 1], n_out[i - 1], fuse=schedule.fuse_dropped), num_prefix, block.attn)
            block.__class__ = _in_block_class(type(block))
        elif sizes is not None and i >= reducing[0]:
            if i in reducing and n_out[i - 1] < n_in[i - 1]:
                block.slim = SlimPoint(BipartiteMerge(n_in[i - 1], n_out[i - 1], num_prefix), num_prefix, block.attn, sizes)
            if i > reducing[0]:  # proportional attention in every block after the first merge
                block.token_sizes = sizes
            block.__class__ = _in_block_class(type(block))

    if sizes is not None:
        model.token_sizes = sizes
        model.__class__ = _merging_model_class(type(model))
    model.slim_schedule = schedule
    model.slim_tokens = n_in  # patch tokens entering each block
    return model


def slim_schedule(model: nn.Module) -> SlimSchedule:
    """The schedule a model runs (reducer 'none' for a plain ViT)."""
    return getattr(model, "slim_schedule", None) or SlimSchedule(reducer="none")


def tokens_per_block(model: nn.Module) -> list[int]:
    """Patch tokens entering each block of `model`, slimmed or not."""
    depth, num_patches, _, _ = model_geometry(model)
    return slim_schedule(model).block_tokens(depth, num_patches)


def tokens_leaving_block(model: nn.Module) -> list[int]:
    """Patch tokens leaving each block of `model` (after its reducer, if any)."""
    depth, num_patches, _, _ = model_geometry(model)
    return slim_schedule(model).block_out_tokens(depth, num_patches)
