"""`features_only` for slimmed ViTs: block outputs as (B, C, H, W) maps on the patch grid, so a SiT
backbone drops into detection and segmentation code written for timm's features (FPNs, UPerNet).

A slimmed block's tokens are no longer a grid: each one stands for a mix of patch positions. This
wrapper follows, during the forward, which positions each token stands for (a source matrix S,
(B, n_tokens, N_patches), rows summing to 1) and spreads every token back over its positions:
    grid[p] = sum_j S[j, p] * token[j] / sum_j S[j, p]
- TSM (SiT): its aggregation weights W (B, n_in, n_out) give S <- W^T S, a soft un-pooling;
- merge (ToMe): the merged token's positions share its value (ToMe's "unmerge"), S merged like x;
- drop (EViT): kept tokens keep their rows; positions whose tokens were dropped read zero (with
  `fuse_dropped`, the fused token spreads over them, weighted as it was fused).
Unslimmed models need none of this: timm's own FeatureGetterNet serves them.

The reducers' mappings are read by forward hooks active only inside this wrapper's forward
(the TSM's weights are recomputed from its input: one extra small MLP per TSM).
"""
from __future__ import annotations

import torch
from timm.models._features import FeatureGetterNet, feature_take_indices

from .peers import BipartiteMerge, TopKDrop
from .slimming import TokenSlimming

_EPS = 1e-12


class GridFeatures(FeatureGetterNet):
    """timm's FeatureGetterNet (`forward_intermediates` of the chosen blocks) with NCHW output for a
    slimmed model: `feature_info` reports the patch size as every level's reduction, as for timm's ViT."""

    def __init__(self, model, out_indices=3, norm: bool = False, prune: bool = True):
        super().__init__(model, out_indices=out_indices, output_fmt="NCHW", norm=norm, prune=prune)
        self._source = None      # S while a forward runs (None: identity, nothing reduced yet)
        self._after: list = []   # S after each block, in block order
        self._active = False
        for block in self.model.blocks:
            slim = getattr(block, "slim", None)
            if slim is not None:
                slim.reducer.register_forward_hook(self._follow)
            block.register_forward_hook(self._snapshot)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, height, width = x.shape
        h, w = self.model.patch_embed.dynamic_feat_size((height, width))
        self._source, self._after, self._active = None, [], True
        try:
            tokens = self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm, output_fmt="NLC",
                                                     intermediates_only=True)
            take, _ = feature_take_indices(len(self.model.blocks), self.out_indices)
            return [_to_grid(t, self._after[i], h, w) for t, i in zip(tokens, take)]
        finally:
            self._source, self._after, self._active = None, [], False

    def _snapshot(self, block, args, output) -> None:
        if self._active:
            self._after.append(self._source)

    def _follow(self, reducer, args, output) -> None:
        if not self._active:
            return
        patches = args[0]                                              # (B, n_in, C)
        source = self._source if self._source is not None else _identity(patches)
        if isinstance(reducer, TokenSlimming):
            self._source = reducer.weights(patches).transpose(1, 2) @ source  # (B, n_out, N)
        elif isinstance(reducer, TopKDrop):
            cls_attn = args[1]
            k = reducer.out_tokens - int(reducer.fuse)
            order = cls_attn.argsort(dim=1, descending=True)            # the reducer's own ranking
            kept = source.gather(1, order[:, :k, None].expand(-1, -1, source.shape[-1]))
            if reducer.fuse:
                dropped = source.gather(1, order[:, k:, None].expand(-1, -1, source.shape[-1]))
                weight = cls_attn.gather(1, order[:, k:])
                fused = (weight[..., None] * dropped).sum(dim=1, keepdim=True)
                kept = torch.cat([kept, fused / fused.sum(dim=-1, keepdim=True).clamp_min(_EPS)], dim=1)
            self._source = kept
        elif isinstance(reducer, BipartiteMerge):
            keys, size = args[1], args[2]
            # .forward, not __call__: the same merge on the source rows, without firing this hook again
            self._source, _ = reducer.forward(source, keys, size)
        else:
            raise TypeError(f"features_only cannot follow reducer {type(reducer).__name__}")


def _identity(patches: torch.Tensor) -> torch.Tensor:
    b, n, _ = patches.shape
    return torch.eye(n, dtype=patches.dtype, device=patches.device).expand(b, n, n)


def _to_grid(tokens: torch.Tensor, source, h: int, w: int) -> torch.Tensor:
    """(B, n, C) tokens -> (B, C, h, w): each patch position averages the tokens holding it."""
    b, _, c = tokens.shape
    if source is not None:
        share = source.sum(dim=1)                                       # (B, N): how much of p survives
        tokens = (source.transpose(1, 2) @ tokens) / share.clamp_min(_EPS)[..., None]  # (B, N, C)
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
