"""SiT's Token Slimming Module (TSM) and its training-only inverse (RTSM), exactly as in docs/method.md.

Both initialise like the official code and timm's ViT: Linear weights trunc_normal(std 0.02),
biases zero, LayerNorms at (1, 0). A random TSM therefore starts near uniform averaging;
`sit_core.warm_start` can start it as a spatial pooling instead.
"""
from __future__ import annotations

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn


class TokenSlimming(nn.Module):
    """Soft aggregation of N patch tokens into N' (docs/method.md "TSM").

    Each output slot is a convex combination of the input tokens: the softmax runs over the
    INPUT axis, so dense static-shape matmuls only (no sort/top-k/gather, export-friendly).
    The last score Linear's bias adds the same logit to a whole column, which that softmax removes:
    it never receives a gradient. The official module has it too; kept so checkpoints map one to one.
    """

    def __init__(self, dim: int, in_tokens: int, out_tokens: int):
        super().__init__()
        self.in_tokens, self.out_tokens = in_tokens, out_tokens
        self.score = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, out_tokens)
        )
        self.scale = nn.Parameter(torch.ones(1))  # learnable inverse temperature (weight-decayed, as official)
        self.apply(init_weights_vit_timm)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Aggregation weights (B, N, N'); column j sums to 1 over the N inputs."""
        return (self.score(x) * self.scale).softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N', C)
        return self.weights(x).transpose(1, 2) @ x

    def extra_repr(self) -> str:
        return f"{self.in_tokens} -> {self.out_tokens} tokens"


class ReverseTokenSlimming(nn.Module):
    """Maps slimmed tokens (B, N', C) back to (B, N, C) for feature distillation (docs/method.md "RTSM").

    Training only: lives in the distillation wrapper, never in the inference model.
    """

    def __init__(self, dim: int, in_tokens: int, out_tokens: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.in_tokens, self.out_tokens = in_tokens, out_tokens
        self.norm = nn.LayerNorm(dim)
        # Mixes along the token axis, so it runs on the transposed (B, C, N') tensor.
        self.token_mlp = Mlp(in_tokens, hidden_features=4 * out_tokens, out_features=out_tokens)
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))
        self.apply(init_weights_vit_timm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N', C) -> (B, N, C)
        x = self.token_mlp(self.norm(x).transpose(1, 2)).transpose(1, 2)  # no residual: shape changes
        return x + self.channel_mlp(self.channel_norm(x))

    def extra_repr(self) -> str:
        return f"{self.in_tokens} -> {self.out_tokens} tokens"
