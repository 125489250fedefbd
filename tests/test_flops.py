"""sit_core.flops: counts against hand computations, models left as found."""
from __future__ import annotations

import pytest
import timm
import torch.nn.functional as F
from torch import nn

from sit_core.flops import count_macs, count_params, macs_by_module, module_macs


def tiny_convnet(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, 10))


class SelfAttention(nn.Module):
    """Attention over the H rows of the image: exercises the CPU SDPA kernel's MAC formula."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, x):  # (B, C, H, W): tokens = H, dim = C * W split over heads
        b, c, h, w = x.shape
        q = x.permute(0, 2, 1, 3).reshape(b, h, self.heads, -1).transpose(1, 2)  # (B, heads, H, d)
        return F.scaled_dot_product_attention(q, q, q)


# --- counting --------------------------------------------------------------------------------

def test_count_macs_deit_small_matches_paper():
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    assert count_macs(model, 224) / 1e9 == pytest.approx(4.6, rel=0.03)
    assert count_params(model) / 1e6 == pytest.approx(22.05, rel=0.01)


def test_count_macs_single_linear_is_in_times_out_times_batch():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    assert count_macs(model, 4) == 48 * 10
    assert count_macs(model, 4, batch=5) == 48 * 10 * 5


def test_count_macs_conv_and_cpu_attention():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, 8) == 8 * 8 * 8 * 3 * 9  # out pixels * out ch * in ch * kernel
    # torch's counter misses the CPU SDPA kernel on its own; two matmuls of L*L*d per head.
    b, heads, c, h, w = 2, 2, 3, 6, 4
    d = c * w // heads
    assert count_macs(SelfAttention(heads), (h, w), batch=b) == 2 * b * heads * h * h * d


def test_macs_breakdown_sums_and_module_macs():
    model = tiny_convnet()
    per = macs_by_module(model, 8)
    assert per[""] == count_macs(model, 8)
    assert per["0"] + per["4"] == per[""]
    assert module_macs(model, nn.Linear, 8) == 8 * 10
    assert module_macs(model, nn.MultiheadAttention, 8) == 0


def test_counting_restores_train_mode():
    model = tiny_convnet().train()
    model[0].eval()  # a mixed state must survive too
    count_macs(model, 8)
    assert model.training and not model[0].training and model[4].training


