"""Peer token reducers under the same schedule API as the TSM: hard drop (EViT) and merge (ToMe).

Both need statistics from the attention of the block they follow: the class token's attention
(drop) or the keys (merge). `AttentionStats` reads them off the block's qkv projection output via
a forward hook, so timm's Attention runs unmodified (fused SDPA included).
"""
from __future__ import annotations

import torch
from torch import nn


class AttentionStats:
    """Captures q and k of one timm Attention during its forward (via a hook on `attn.qkv`)."""

    def __init__(self, attn: nn.Module):
        self.attn, self.q, self.k = attn, None, None
        self.handle = attn.qkv.register_forward_hook(self._capture)

    def _capture(self, module, args, qkv):
        b, n, _ = qkv.shape
        a = self.attn
        q, k, _ = qkv.reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        self.q, self.k = a.q_norm(q), a.k_norm(k)  # (B, H, N, hd) each

    def cls_attention(self, num_prefix: int) -> torch.Tensor:
        """Head-averaged attention of the class token over the patch tokens: (B, N_patches)."""
        q_cls = self.q[:, :, :1]  # (B, H, 1, hd)
        attn = (q_cls @ self.k.transpose(-2, -1) * self.attn.scale).softmax(dim=-1)  # (B, H, 1, N)
        return attn[:, :, 0, num_prefix:].mean(dim=1)

    def patch_keys(self, num_prefix: int) -> torch.Tensor:
        """Keys averaged over heads, patch tokens only: (B, N_patches, hd) — ToMe's similarity metric."""
        return self.k[:, :, num_prefix:].mean(dim=1)


class TopKDrop(nn.Module):
    """EViT-style hard dropping: keep the tokens the class token attends to most.

    With `fuse=True` the dropped tokens are fused into one token weighted by that attention;
    the kept count is then out_tokens - 1 so the scheduled token count still holds.
    """

    def __init__(self, in_tokens: int, out_tokens: int, fuse: bool = False):
        super().__init__()
        if fuse and out_tokens < 2:
            raise ValueError(f"drop with fusion needs at least 2 output tokens, got {out_tokens}")
        self.in_tokens, self.out_tokens, self.fuse = in_tokens, out_tokens, fuse

    def forward(self, x: torch.Tensor, cls_attn: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        k = self.out_tokens - int(self.fuse)
        order = cls_attn.argsort(dim=1, descending=True)  # (B, N)
        keep_idx = order[:, :k]
        kept = x.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, c))
        if not self.fuse:
            return kept
        drop_idx = order[:, k:]
        dropped = x.gather(1, drop_idx.unsqueeze(-1).expand(-1, -1, c))
        w = cls_attn.gather(1, drop_idx)
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
        fused = (w.unsqueeze(-1) * dropped).sum(dim=1, keepdim=True)
        return torch.cat([kept, fused], dim=1)

    def extra_repr(self) -> str:
        return f"{self.in_tokens} -> {self.out_tokens} tokens, fuse={self.fuse}"


class BipartiteMerge(nn.Module):
    """ToMe-style bipartite soft matching: merge the most similar (A, B) pairs by size-weighted mean.

    One bipartite round can at most halve the tokens, so deeper reductions run several rounds.
    Token sizes persist across the merge points of one forward through a shared `MergeState`.
    """

    def __init__(self, in_tokens: int, out_tokens: int, state: "MergeState", first: bool):
        super().__init__()
        self.in_tokens, self.out_tokens, self.state, self.first = in_tokens, out_tokens, state, first

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        size = x.new_ones(b, n, 1) if self.first or self.state.size is None else self.state.size
        while x.shape[1] > self.out_tokens:
            x, keys, size = _merge_round(x, keys, size, x.shape[1] - self.out_tokens)
        self.state.size = size
        return x

    def extra_repr(self) -> str:
        return f"{self.in_tokens} -> {self.out_tokens} tokens"


class MergeState:
    """Per-forward token sizes shared by the merge points of one model (ToMe's `_tome_info`)."""

    def __init__(self):
        self.size = None


def _merge_round(x, keys, size, r):
    """One round of bipartite soft matching (after ToMe's `bipartite_soft_matching`, adapted)."""
    a_x, b_x = x[:, ::2], x[:, 1::2]
    r = min(r, a_x.shape[1], b_x.shape[1])
    metric = keys / keys.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # (B, Na, Nb)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True).unsqueeze(-1)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx.unsqueeze(-1).gather(1, src_idx)

    def merge(t):  # sums sources into their destinations; callers pre-multiply by size
        ta, tb = t[:, ::2], t[:, 1::2]
        d = t.shape[-1]
        unm = ta.gather(1, unm_idx.expand(-1, -1, d))
        src = ta.gather(1, src_idx.expand(-1, -1, d))
        return unm, tb.scatter_reduce(1, dst_idx.expand(-1, -1, d), src, reduce="sum")

    unm_x, dst_x = merge(x * size)
    unm_s, dst_s = merge(size)
    unm_k, dst_k = merge(keys * size)
    new_size = torch.cat([unm_s, dst_s], dim=1)
    new_x = torch.cat([unm_x, dst_x], dim=1) / new_size
    new_keys = torch.cat([unm_k, dst_k], dim=1) / new_size
    return new_x, new_keys, new_size
