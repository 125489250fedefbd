"""TSM warm start (the default, `TrainSpec.tsm_init="pool"`): begin every TSM as a spatial pooling of the token grid.

A random TSM (trunc_normal 0.02 scores) starts near UNIFORM averaging: every output slot is about
the mean of all input tokens, so at step 0 the student throws away the spatial structure the
teacher's tokens carry and the first steps of FRD are spent rebuilding it. `warm_start_tsms`
instead fits each TSM's score head so its initial aggregation approximates a Gaussian pooling
around N' well-spread centres of the token grid:

  1. run the student on one batch; take the tokens entering the TSM and their 2-D positions
     (grid coordinates at the first TSM, then carried through earlier TSMs as the convex
     combinations those TSMs make, pos' = A^T pos);
  2. centres: N' farthest-point samples of the (batch-mean) positions; width sigma with
     2*pi*sigma^2 = area per output slot;
  3. target logits z*_ij = -|p_i - c_j|^2 / (2 sigma^2) (softmax over inputs i gives the pooling),
     floored at -8 below each column's best;
  4. ridge least squares of z* on the score MLP's hidden features (LayerNorm -> Linear -> GELU,
     left as they are) gives the last Linear's weight and bias; the scale is reset to 1.
Token features carry the position embeddings, which is what makes position linearly readable.
Only the TSMs change; the backbone and RTSMs are untouched. It is the default because it measured
better than the paper's random start at the same MACs and budget (`sweeps/compare_reducers.py
--arms sit,sit+pool`, README); `tsm_init="random"` keeps the paper's start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .patch import model_geometry
from .slimming import TokenSlimming

LOG_FLOOR = -8.0  # target log-weights below the column's best are clamped here (e^-8 ~ 3e-4)


@dataclass(frozen=True)
class WarmStart:
    """What warm-starting one TSM did, measured on the fitting batch."""

    block: int              # the TSM runs after this (1-indexed) block
    tokens: tuple[int, int]  # (in, out)
    sigma: float            # pooling width, in patch units
    error_before: float     # mean total-variation distance of the aggregation to the target pooling
    error_after: float


def pooling_target(positions: torch.Tensor, out_tokens: int, grid_area: float):
    """Target log-weights (B, N, N') and sigma for pooling N positioned tokens (B, N, 2) into N' slots."""
    mean = positions.mean(dim=0)                                   # (N, 2): slots mean the same place in every image
    centres = mean[farthest_points(mean, out_tokens)].expand(positions.shape[0], -1, -1)  # (B, N', 2)
    sigma = math.sqrt(grid_area / out_tokens / (2 * math.pi))
    logits = -torch.cdist(positions, centres).square() / (2 * sigma ** 2)  # (B, N, N')
    logits = logits - logits.amax(dim=1, keepdim=True)
    return logits.clamp_min(LOG_FLOOR), sigma


def farthest_points(points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of k well-spread points of (N, 2) (farthest-point sampling from the first point)."""
    chosen = [0]
    dist = (points - points[0]).norm(dim=-1)
    for _ in range(k - 1):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, (points - points[nxt]).norm(dim=-1))
    return torch.tensor(chosen, device=points.device)


def aggregation_error(weights: torch.Tensor, target_logits: torch.Tensor) -> float:
    """Mean over images and output slots of the total-variation distance between two poolings (B, N, N')."""
    target = target_logits.softmax(dim=1)
    return float(0.5 * (weights - target).abs().sum(dim=1).mean())


@torch.no_grad()
def fit_score_head(tsm: TokenSlimming, tokens: torch.Tensor, target_logits: torch.Tensor, ridge: float = 1e-2) -> None:
    """Set the TSM's last Linear so its logits best match `target_logits` (B, N, N') on `tokens` (B, N, C)."""
    hidden = tsm.score[:-1](tokens).flatten(0, 1)                       # (B*N, C/2)
    feats = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], 1)  # + bias column
    z = target_logits.flatten(0, 1)                                       # (B*N, N')
    gram = feats.T @ feats
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram, feats.T @ z)                             # (C/2 + 1, N')
    head = tsm.score[-1]
    head.weight.copy_(w[:-1].T)
    head.bias.copy_(w[-1])
    tsm.scale.fill_(1.0)


@torch.no_grad()
def warm_start_tsms(student: nn.Module, images: torch.Tensor, ridge: float = 1e-2) -> list[WarmStart]:
    """Fit every TSM of `student`, in order, as a spatial pooling (see the module docstring).

    `images`: one batch the student accepts (B, C, H, W); a few dozen images are plenty. The student
    keeps its train/eval mode. Returns one `WarmStart` per TSM (empty for a model without TSMs).
    """
    model_geometry(student)  # a timm ViT, or a clear error
    tsms = [(i, b.slim.reducer) for i, b in enumerate(student.blocks, start=1)
            if isinstance(getattr(getattr(b, "slim", None), "reducer", None), TokenSlimming)]
    gh, gw = student.patch_embed.grid_size
    was_training = student.training
    student.eval()
    reports = []
    try:
        for k, (block, tsm) in enumerate(tsms):
            entering = _tokens_entering(student, [t for _, t in tsms[:k + 1]], images)
            rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            pos = torch.stack([rows, cols], -1).flatten(0, 1).to(images.device, torch.float32)  # (N0, 2), row-major
            pos = pos.expand(images.shape[0], -1, -1)
            for (_, earlier), x in zip(tsms[:k], entering[:k]):
                pos = earlier.weights(x).transpose(1, 2).float() @ pos  # (B, N', 2): where each slot now sits
            x = entering[k]
            target, sigma = pooling_target(pos, tsm.out_tokens, float(gh * gw))
            before = aggregation_error(tsm.weights(x).float(), target)
            fit_score_head(tsm, x.float(), target, ridge)
            after = aggregation_error(tsm.weights(x).float(), target)
            reports.append(WarmStart(block, (tsm.in_tokens, tsm.out_tokens), sigma, before, after))
    finally:
        student.train(was_training)
    return reports


def _tokens_entering(student: nn.Module, tsms: list, images: torch.Tensor) -> list[torch.Tensor]:
    """Patch tokens entering each of `tsms` in one forward of the student."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [t.register_forward_pre_hook(lambda m, a, j=j: seen.__setitem__(j, a[0])) for j, t in enumerate(tsms)]
    try:
        student.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    return [seen[j] for j in range(len(tsms))]
