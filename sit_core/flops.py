"""Parameters and multiply-accumulates (MACs) of a model: one counter for every model.

MACs come from torch's FlopCounterMode, multiply-add counted once (papers' "FLOPs": DeiT-S 4.6 G).
Counts depend on shapes only, so they run where the model lives and leave it as they found it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ImgSize = Union[int, Sequence[int]]
ModuleTypes = Union[type, tuple[type, ...]]


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode only knows the CUDA attention kernels; on CPU timm's fused attention lands in
# these ops and would count 0, undercounting DeiT-S by ~0.36 GMACs. Same formula as torch's.
_CPU_SDPA_FORMULAS = {op: _sdpa_flop for op in (
    getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None),
    getattr(torch.ops.aten, "_scaled_dot_product_fused_attention_overrideable", None),
) if op is not None}


def hw(img_size: ImgSize) -> tuple[int, int]:
    """(height, width) from an int or a pair."""
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = img_size
    return int(h), int(w)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside, every submodule's own flag restored after (a caller may have frozen parts)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def count_params(model: nn.Module) -> int:
    """Number of parameters of the model as given (the inference model: no RTSM, no teacher)."""
    return sum(p.numel() for p in model.parameters())


def _counter(model: nn.Module, img_size: ImgSize, in_chans: int, batch: int) -> FlopCounterMode:
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x = torch.randn(batch, in_chans, *hw(img_size), device=device, dtype=dtype)
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FORMULAS)
    with eval_mode(model), torch.no_grad(), counter:
        model(x)
    return counter


def count_macs(model: nn.Module, img_size: ImgSize, in_chans: int = 3, batch: int = 1) -> float:
    """MACs of one eval-mode forward pass (batch 1 by default).

    FlopCounterMode counts 2 FLOPs per MAC for matmul / conv / attention, so this is its total / 2.
    Like fvcore it ignores element-wise ops (norms, activations, softmax) and index ops (sort, gather).
    """
    return _counter(model, img_size, in_chans, batch).get_total_flops() / 2


def macs_by_module(model: nn.Module, img_size: ImgSize, in_chans: int = 3, batch: int = 1) -> dict[str, float]:
    """MACs spent inside every named submodule (nested ones included); key "" is the total."""
    counts = _counter(model, img_size, in_chans, batch).get_flop_counts()
    root = type(model).__name__
    out: dict[str, float] = {}
    for key, per_op in counts.items():
        if key == "Global":
            out[""] = sum(per_op.values()) / 2
        elif key.startswith(root + "."):
            out[key[len(root) + 1:]] = sum(per_op.values()) / 2
    return out


def outermost(model: nn.Module, module_types: ModuleTypes) -> list[tuple[str, nn.Module]]:
    """Named modules of the given types, skipping ones nested in another match (no double count)."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, module_types) and not any(name.startswith(n + ".") for n, _ in found):
            found.append((name, m))
    return found


def module_macs(model: nn.Module, module_types: ModuleTypes, img_size: ImgSize, in_chans: int = 3,
                batch: int = 1) -> float:
    """MACs spent inside modules of the given types, e.g. the TSMs' own cost."""
    per_module = macs_by_module(model, img_size, in_chans, batch)
    return sum(per_module.get(name, 0.0) for name, _ in outermost(model, module_types))
