"""Feature Recalibration Distillation loss (docs/method.md "FRD"): CE + token MSE over all blocks + logit KD."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FRDLoss(nn.Module):
    """L = L_cls + lambda_token * L_token + lambda_logits * L_logits.

    - L_cls: cross-entropy on class indices (B,) or soft targets (B, K) from mixup/cutmix.
    - L_token: mean over blocks of MSE(student tokens recovered by RTSM, teacher patch tokens).
    - L_logits: tau^2 * KL(teacher || student) on softmax(logits / tau), batch mean.
    Returns (total, parts) where parts holds every component (detached) for logging.
    """

    def __init__(self, lambda_token: float = 2.0, lambda_logits: float = 2.0, tau: float = 1.0):
        super().__init__()
        if lambda_token < 0 or lambda_logits < 0:
            raise ValueError(f"loss weights must be >= 0, got lambda_token={lambda_token}, lambda_logits={lambda_logits}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.lambda_token, self.lambda_logits, self.tau = lambda_token, lambda_logits, tau

    def forward(self, student_logits: torch.Tensor, student_tokens: Sequence[torch.Tensor],
                teacher_logits: torch.Tensor, teacher_tokens: Sequence[torch.Tensor],
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(student_tokens) != len(teacher_tokens):
            raise ValueError(f"{len(student_tokens)} student token maps for {len(teacher_tokens)} teacher blocks")
        cls = F.cross_entropy(student_logits, target)  # class indices (B,) or probabilities (B, K)
        if student_tokens:
            token = torch.stack([F.mse_loss(s, t) for s, t in zip(student_tokens, teacher_tokens)]).mean()
        else:
            token = student_logits.new_zeros(())
        tau = self.tau
        logits = F.kl_div(F.log_softmax(student_logits / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                          reduction="batchmean", log_target=True) * tau * tau
        total = cls + self.lambda_token * token + self.lambda_logits * logits
        parts = {"loss": total.detach(), "loss_cls": cls.detach(), "loss_token": token.detach(),
                 "loss_logits": logits.detach()}
        return total, parts

    def extra_repr(self) -> str:
        return f"lambda_token={self.lambda_token}, lambda_logits={self.lambda_logits}, tau={self.tau}"
