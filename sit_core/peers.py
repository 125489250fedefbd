"""Peer token reducers under the same schedule API as the TSM: hard drop (EViT) and merge (ToMe).

Both reduce INSIDE a block, between its attention and its MLP, as their papers do (`patch.py`
splits the block there), and both read that block's own attention: the class token's attention
(drop) or the keys (merge). `AttentionStats` takes q and k off the block's qkv projection with a
forward hook, so timm's Attention runs unmodified (fused SDPA included). After a merge, later
blocks add log(token size) to their attention logits (ToMe's proportional attention) through the
float `attn_mask` timm's Attention hands to `F.scaled_dot_product_attention`: no fork of Attention.

Where this still differs from the published methods:
  * Token counts follow the project's one rule (stage i keeps int(N0 * prod keep), the fused token
    counted in), so every reducer at one schedule keeps the same number of tokens. EViT keeps
    ceil(keep * n) and adds the fused token on top (DeiT-S 224, keep 0.7, fused: 139/99/71 patch
    tokens; here 137/96/67).
  * EViT shrinks gradually while it fine-tunes (keep rate 1 -> 0.7 over the first epochs); here the
    scheduled keep holds from the first step. No new parameters either way.
  * ToMe's own schedule (`merge:rN`) is one bipartite round of r per block, as published. The
    positions@keep form (merging at SiT's positions) is an adaptation: when more than half of a
    block's tokens must go, it runs several rounds in that block, re-matching on size-weighted keys.
  * ToMe alternates its A/B sets over ALL tokens with the prefix protected; here the prefix is split
    off first and the patch tokens alternate with the parity ToMe gives them, the same partition.
    Merged tokens come out as [unmerged A, B] (ToMe's order); attention is order-free.
  * A merge model does not support gradient checkpointing (recomputing a block would re-merge with
    the forward's final sizes), as in ToMe.
"""
from __future__ import annotations

from contextlib import contextmanager

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
        """Head-averaged softmax attention of the class token over the patch tokens: (B, N_patches).

        As EViT: softmax over all keys (prefix included), then the patch columns, NOT renormalised.
        """
        q_cls = self.q[:, :, :1]  # (B, H, 1, hd)
        attn = (q_cls @ self.k.transpose(-2, -1) * self.attn.scale).softmax(dim=-1)  # (B, H, 1, N)
        return attn[:, :, 0, num_prefix:].mean(dim=1)

    def patch_keys(self, num_prefix: int) -> torch.Tensor:
        """Keys averaged over heads, patch tokens only: (B, N_patches, hd) — ToMe's similarity metric."""
        return self.k[:, :, num_prefix:].mean(dim=1)

    def clear(self) -> None:
        self.q = self.k = None  # do not hold a forward's activations until the next one


class TopKDrop(nn.Module):
    """EViT: keep the patch tokens the class token attends to most (top-k, head-averaged attention).

    With `fuse=True` the dropped tokens become one token, their sum weighted by their raw class
    attention (EViT's "inattentive token fusion"); k = out_tokens - 1 are kept so the scheduled
    count holds.
    """

    def __init__(self, in_tokens: int, out_tokens: int, fuse: bool = False):
        super().__init__()
        if fuse and out_tokens < 2:
            raise ValueError(f"drop with fusion needs at least 2 output tokens, got {out_tokens}")
        self.in_tokens, self.out_tokens, self.fuse = in_tokens, out_tokens, fuse

    def forward(self, x: torch.Tensor, cls_attn: torch.Tensor) -> torch.Tensor:  # (B, N, C), (B, N)
        c = x.shape[-1]
        k = self.out_tokens - int(self.fuse)
        # one descending sort splits kept / dropped exactly (topk twice could overlap on ties)
        order = cls_attn.argsort(dim=1, descending=True)  # (B, N)
        kept = x.gather(1, order[:, :k, None].expand(-1, -1, c))
        if not self.fuse:
            return kept
        drop_idx = order[:, k:]
        dropped = x.gather(1, drop_idx[..., None].expand(-1, -1, c))  # (B, N - k, C)
        weight = cls_attn.gather(1, drop_idx)                          # (B, N - k), raw attention
        fused = (weight[..., None] * dropped).sum(dim=1, keepdim=True)  # (B, 1, C)
        return torch.cat([kept, fused], dim=1)

    def extra_repr(self) -> str:
        return f"{self.in_tokens} -> {self.out_tokens} tokens, fuse={self.fuse}"


class BipartiteMerge(nn.Module):
    """ToMe: bipartite soft matching on the keys, the most similar (A, B) pairs merged by size-weighted mean.

    One round removes at most half of the tokens; `in_tokens - out_tokens` beyond that (positions@keep
    form only) runs further rounds. Returns the merged tokens and their sizes (tokens they hold).
    """

    def __init__(self, in_tokens: int, out_tokens: int, num_prefix: int):
        super().__init__()
        self.in_tokens, self.out_tokens = in_tokens, out_tokens
        self.parity = num_prefix % 2  # ToMe's A set = even indices over all tokens, prefix included

    def forward(self, x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor | None):
        # x (B, N, C) patch tokens, keys (B, N, hd), size (B, N, 1) or None (all 1) -> x', size'
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        while x.shape[1] > self.out_tokens:
            x, keys, size = merge_round(x, keys, size, x.shape[1] - self.out_tokens, self.parity)
        return x, size

    def extra_repr(self) -> str:
        return f"{self.in_tokens} -> {self.out_tokens} tokens"


def merge_round(x, keys, size, r: int, parity: int = 0):
    """One round of bipartite soft matching + size-weighted merge of r tokens.

    Adapted from ToMe's `bipartite_soft_matching` and `merge_wavg` (tome/merge.py): A = tokens at
    positions parity, parity+2, ...; each A token's best B match by cosine similarity of the keys;
    the r best-matched A tokens are summed (times size) into their B destination.
    """
    a_sl, b_sl = slice(parity, None, 2), slice(1 - parity, None, 2)
    n_b = x[:, b_sl].shape[1]
    r = min(r, x[:, a_sl].shape[1], n_b, x.shape[1] // 2)
    with torch.no_grad():
        metric = keys / keys.norm(dim=-1, keepdim=True)
        scores = metric[:, a_sl] @ metric[:, b_sl].transpose(-1, -2)  # (B, Na, Nb)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]  # unmerged / merged A tokens
        dst_idx = node_idx[..., None].gather(1, src_idx)

    def merge(t):  # sum A sources into their B destinations
        ta, tb = t[:, a_sl], t[:, b_sl]
        d = t.shape[-1]
        unm = ta.gather(1, unm_idx.expand(-1, -1, d))
        src = ta.gather(1, src_idx.expand(-1, -1, d))
        return torch.cat([unm, tb.scatter_reduce(1, dst_idx.expand(-1, -1, d), src, reduce="sum")], dim=1)

    new_size = merge(size)
    return merge(x * size) / new_size, merge(keys * size) / new_size, new_size


class TokenSizes:
    """Token sizes shared by the blocks of one merging model (ToMe's `_tome_info["size"]`).

    Sizes live only inside `session()`, which the patched model's forward opens, so they persist
    across the merge points of ONE forward. Outside a session (a block called alone) every token
    has size 1.
    """

    def __init__(self):
        self.size: torch.Tensor | None = None  # (B, N_patches, 1)
        self.active = False

    @contextmanager
    def session(self):
        if self.active:  # forward_features inside forward_intermediates & co: one session
            yield
            return
        self.active, self.size = True, None
        try:
            yield
        finally:
            self.active, self.size = False, None

    def current(self) -> torch.Tensor | None:
        return self.size if self.active else None

    def update(self, size: torch.Tensor) -> None:
        if self.active:
            self.size = size

    def attn_bias(self, x: torch.Tensor) -> torch.Tensor:
        """Proportional attention: log(size) of every key, (B, 1, 1, N); prefix tokens (and every token
        outside a session) have size 1, log 1 = 0. Always a tensor, so a block times the same kernel
        (SDPA with a float mask) alone as inside the model."""
        b, n, _ = x.shape
        bias = x.new_zeros(b, 1, 1, n)
        size = self.current()
        if size is not None:
            bias[:, 0, 0, n - size.shape[1]:] = size[..., 0].log()
        return bias
