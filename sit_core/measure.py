"""Parameters, MACs and speed of an inference model: one protocol for every model.

SPEC "Measuring speed honestly": eval mode, no grad, fixed batch and resolution, seeded random
input, warm-up discarded, the device synchronised before every clock read, img/s and latency
percentiles reported together with device, dtype, batch, threads and library versions.
MACs come from one counter (torch's FlopCounterMode) for every model, multiply-add counted once.
Speed is only meaningful as a ratio to a baseline measured in the same process: `compare()`.

Every function leaves the model as it found it (train/eval mode, device, torch threads).
Pure PyTorch + timm: this runs inside every search trial, so no Ray / MLflow here.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ImgSize = Union[int, Sequence[int]]
ModuleTypes = Union[type, tuple[type, ...]]

WARMUP = 10  # discarded iterations: allocator, oneDNN/cuDNN autotuning, caches, clocks
ITERS = 50   # timed iterations, each timed on its own
SEED = 0     # random input is seeded so every model sees the same tensor

_aten = torch.ops.aten


def _sdpa_shapes_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode only knows the CUDA attention kernels; on CPU timm's fused attention lands in
# these ops and would count 0, undercounting DeiT-S by ~0.36 GMACs. Same formula as torch's.
_EXTRA_FLOP_FORMULAS = {
    op: _sdpa_shapes_flop
    for op in (
        getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None),
        getattr(_aten, "_scaled_dot_product_fused_attention_overrideable", None),
    )
    if op is not None
}


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------

def count_params(model: nn.Module) -> int:
    """Number of parameters of the model as given (the inference model: no RTSM, no teacher)."""
    return sum(p.numel() for p in model.parameters())


def _hw(img_size: ImgSize) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = img_size
    return int(h), int(w)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, (p.dtype if p.is_floating_point() else torch.float32)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    # Restore every submodule's flag, not just the root's: a caller may have frozen parts.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _flop_counter(model: nn.Module, img_size: ImgSize, in_chans: int, batch: int) -> FlopCounterMode:
    device, dtype = _model_device_dtype(model)
    x = torch.randn(batch, in_chans, *_hw(img_size), device=device, dtype=dtype)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with _eval_mode(model), torch.no_grad(), counter:
        model(x)
    return counter


def count_macs(model: nn.Module, img_size: ImgSize, in_chans: int = 3, batch: int = 1) -> float:
    """Multiply-accumulates (MACs) of one eval-mode forward pass, batch 1 by default.

    Papers' "FLOPs" (DeiT-S 4.6 G) are MACs. FlopCounterMode counts 2 FLOPs per MAC for
    matmul / conv / attention, so this returns its total / 2. Like fvcore it ignores
    element-wise ops (norms, activations, softmax) and index ops (sort, gather): only
    matmul, conv and attention count. Runs where the model lives (a fresh model: CPU);
    counts depend on shapes only.
    """
    return _flop_counter(model, img_size, in_chans, batch).get_total_flops() / 2


def macs_by_module(model: nn.Module, img_size: ImgSize, in_chans: int = 3, batch: int = 1) -> dict[str, float]:
    """MACs spent inside every named submodule (nested ones included); key "" is the total."""
    counts = _flop_counter(model, img_size, in_chans, batch).get_flop_counts()
    root = type(model).__name__
    out: dict[str, float] = {}
    for key, per_op in counts.items():
        if key == "Global":
            name = ""
        elif key == root:
            continue  # same as Global unless something ran outside the root module
        elif key.startswith(root + "."):
            name = key[len(root) + 1:]
        else:
            continue
        out[name] = sum(per_op.values()) / 2
    return out


def _outermost(model: nn.Module, module_types: ModuleTypes) -> list[tuple[str, nn.Module]]:
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
    return sum(per_module.get(name, 0.0) for name, _ in _outermost(model, module_types))


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def device_name(device: Union[str, torch.device] = "cpu") -> str:
    """Human name of the device: the GPU's name, or the CPU model and its logical core count."""
    device = _as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown cpu"
    return f"{name} ({os.cpu_count()} logical cpus)"


def _as_device(device: Union[str, torch.device]) -> torch.device:
    # "cuda" and "cuda:0" must compare equal, or the model is moved for nothing.
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None  # CPU ops are synchronous


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    # fp32 runs plain; bf16 / fp16 run as AMP (weights stay fp32, matmuls in low precision),
    # the way the reference recipe trains and how papers time "AMP" throughput.
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _bench_setup(model: nn.Module, device: torch.device, threads: int | None,
                 channels_last: bool) -> Iterator[None]:
    """Eval mode, target device, thread count and memory format; restore mode/device/threads."""
    old_threads = torch.get_num_threads()
    old_device, _ = _model_device_dtype(model)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if old_device != device:
            model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)  # only 4-D weights change (convs)
        with _eval_mode(model):
            yield
    finally:
        if old_device != device:
            model.to(old_device)
        torch.set_num_threads(old_threads)


def _make_input(batch_size: int, img_size: ImgSize, in_chans: int, device: torch.device,
                channels_last: bool, seed: int) -> torch.Tensor:
    # Generated on CPU so the same seed gives the same tensor on every device.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, in_chans, *_hw(img_size), generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _time_forward(model: nn.Module, x: torch.Tensor, *, device: torch.device, dtype: torch.dtype,
                  warmup: int, iters: int) -> list[float]:
    """Seconds per forward for `iters` runs after `warmup` discarded ones (model already set up)."""
    sync = _synchronizer(device)
    samples: list[float] = []
    with torch.inference_mode(), _autocast(device, dtype):
        for _ in range(warmup):
            model(x)
        sync()
        for _ in range(iters):
            t0 = time.perf_counter()
            model(x)
            sync()  # a CUDA forward returns before the GPU is done; wait before reading the clock
            samples.append(time.perf_counter() - t0)
    return samples


def _versions() -> dict[str, str]:
    import timm

    return {
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": platform.python_version(),
    }


@dataclass(frozen=True)
class SpeedRecord:
    """One speed measurement and everything needed to reproduce it."""

    img_s: float          # batch_size * samples / total timed seconds
    mean_ms: float        # per-batch latency statistics over the timed iterations
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    samples: int          # timed iterations in all (warm-up excluded)
    warmup: int           # discarded iterations per round
    rounds: int           # 1, or compare()'s interleaved rounds whose samples are pooled
    batch_size: int
    img_size: tuple[int, int]
    in_chans: int
    device: str           # "cpu", "cuda:0", ...
    device_name: str      # GPU name or CPU model
    dtype: str            # float32 = plain fp32; bfloat16 / float16 = autocast (AMP)
    channels_last: bool
    threads: int          # torch intra-op threads during the run
    torch_version: str
    timm_version: str
    python_version: str

    def to_dict(self) -> dict:
        return asdict(self)

    def protocol(self) -> str:
        h, w = self.img_size
        amp = "" if self.dtype == "float32" else " (autocast)"
        timing = f"{self.warmup} warm-up discarded + {self.samples} timed iters"
        if self.rounds > 1:
            timing = (f"{self.rounds} rounds interleaved with the other models x ({self.warmup} warm-up "
                      f"discarded + {self.samples // self.rounds} timed iters)")
        return (
            f"{self.device_name} [{self.device}], {self.dtype}{amp}, batch {self.batch_size}, "
            f"{self.in_chans}x{h}x{w}, {self.threads} threads"
            f"{', channels_last' if self.channels_last else ''}, eval + inference_mode, "
            f"seeded random input, {timing} (each iteration synced and timed separately); "
            f"torch {self.torch_version}, "
            f"timm {self.timm_version}, python {self.python_version}"
        )


def _record(samples: Sequence[float], *, warmup: int, rounds: int, batch_size: int, img_size: ImgSize,
            in_chans: int, device: torch.device, dtype: torch.dtype, channels_last: bool,
            threads: int) -> SpeedRecord:
    ms = np.asarray(samples, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return SpeedRecord(
        img_s=float(batch_size * len(ms) / (ms.sum() / 1e3)),
        mean_ms=float(ms.mean()),
        std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        min_ms=float(ms.min()),
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        samples=len(ms),
        warmup=warmup,
        rounds=rounds,
        batch_size=batch_size,
        img_size=_hw(img_size),
        in_chans=in_chans,
        device=str(device),
        device_name=device_name(device),
        dtype=str(dtype).removeprefix("torch."),
        channels_last=channels_last,
        threads=threads,
        **_versions(),
    )


def measure_speed(model: nn.Module, *, batch_size: int, img_size: ImgSize, in_chans: int = 3,
                  device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                  warmup: int = WARMUP, iters: int = ITERS, threads: int | None = None,
                  channels_last: bool = False, seed: int = SEED) -> SpeedRecord:
    """Throughput and latency of `model` under the SPEC protocol (see module docstring).

    `dtype` other than float32 runs under autocast (AMP). `threads` sets torch's intra-op
    threads for the run only. Syncing after every iteration costs a few microseconds of GPU
    idle per batch: negligible at the batch sizes we report, and it buys per-iteration latency.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    device = _as_device(device)
    with _bench_setup(model, device, threads, channels_last):
        used_threads = torch.get_num_threads()
        x = _make_input(batch_size, img_size, in_chans, device, channels_last, seed)
        samples = _time_forward(model, x, device=device, dtype=dtype, warmup=warmup, iters=iters)
    return _record(samples, warmup=warmup, rounds=1, batch_size=batch_size, img_size=img_size, in_chans=in_chans,
                   device=device, dtype=dtype, channels_last=channels_last, threads=used_threads)


def module_time_share(model: nn.Module, module_types: ModuleTypes, *, batch_size: int, img_size: ImgSize,
                      in_chans: int = 3, device: Union[str, torch.device] = "cpu",
                      dtype: torch.dtype = torch.float32, warmup: int = 3, iters: int = 5,
                      threads: int | None = None, seed: int = SEED) -> float:
    """Share of forward wall time spent inside modules of `module_types` (e.g. the TSMs), in [0, 1].

    Forward pre/post hooks synchronise the device and accumulate perf_counter time around each
    outermost matching module. The hooks and their syncs add a little overhead (microseconds
    per call) and on GPU stop kernel overlap at the module boundary, so this is an estimate of
    the share, not a speed number; report speed from measure_speed / compare.
    Returns 0.0 without running when the model has no such module.
    """
    targets = _outermost(model, module_types)
    if not targets:
        return 0.0
    device = _as_device(device)
    sync = _synchronizer(device)
    inside = [0.0]
    started: dict[int, float] = {}

    def pre(mod: nn.Module, args) -> None:
        sync()
        started[id(mod)] = time.perf_counter()

    def post(mod: nn.Module, args, out) -> None:
        sync()
        inside[0] += time.perf_counter() - started.pop(id(mod))

    handles = []
    try:
        for _, m in targets:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        with _bench_setup(model, device, threads, channels_last=False):
            x = _make_input(batch_size, img_size, in_chans, device, False, seed)
            _time_forward(model, x, device=device, dtype=dtype, warmup=warmup, iters=0)
            inside[0] = 0.0  # warm-up time inside the modules does not count
            total = sum(_time_forward(model, x, device=device, dtype=dtype, warmup=0, iters=iters))
    finally:
        for h in handles:
            h.remove()
    return min(1.0, inside[0] / total) if total > 0 else 0.0


def compare(models: Mapping[str, nn.Module], baseline: str, *, batch_size: int, img_size: ImgSize,
            in_chans: int = 3, device: Union[str, torch.device] = "cpu",
            dtype: torch.dtype = torch.float32, warmup: int = 3, iters: int = 10, rounds: int = 3,
            threads: int | None = None, channels_last: bool = False,
            baseline_of: Mapping[str, str] | None = None, seed: int = SEED):
    """Measure every model in this process, interleaved, and return one row per model.

    Timing runs round-robin: `rounds` rounds, each running every model for `warmup` discarded
    + `iters` timed forwards, with the starting model rotated each round, so machine drift
    (other jobs, clocks, heat) lands on every model alike. Samples of all rounds are pooled.
    `speedup` is img/s over the baseline's; `flops_speedup` is baseline MACs / model MACs (what
    FLOPs predict); `efficiency` = speedup / flops_speedup (1.0: FLOPs saved turn fully into speed).
    `baseline_of` maps a model to a different baseline (e.g. SiT-DeiT-T -> DeiT-T).
    Returns a pandas DataFrame; `df.attrs["records"]` holds each model's pooled SpeedRecord.
    """
    import pandas as pd

    baseline_of = dict(baseline_of or {})
    for name in [baseline, *baseline_of.values()]:
        if name not in models:
            raise KeyError(f"baseline {name!r} is not one of the models: {sorted(models)}")
    device = _as_device(device)
    names = list(models)
    macs = {n: count_macs(m, img_size, in_chans) for n, m in models.items()}
    samples: dict[str, list[float]] = {n: [] for n in names}
    with contextlib.ExitStack() as stack:
        # Set every model up once (one device transfer each), not once per round.
        for m in models.values():
            stack.enter_context(_bench_setup(m, device, threads, channels_last))
        used_threads = torch.get_num_threads()
        x = _make_input(batch_size, img_size, in_chans, device, channels_last, seed)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                samples[n] += _time_forward(models[n], x, device=device, dtype=dtype,
                                            warmup=warmup, iters=iters)
    records = {
        n: _record(samples[n], warmup=warmup, rounds=rounds, batch_size=batch_size, img_size=img_size,
                   in_chans=in_chans, device=device, dtype=dtype, channels_last=channels_last,
                   threads=used_threads)
        for n in names
    }
    rows = []
    for n in names:
        base = baseline_of.get(n, baseline)
        speedup = records[n].img_s / records[base].img_s
        flops_speedup = macs[base] / macs[n] if macs[n] > 0 else float("nan")
        rows.append({
            "name": n,
            "baseline": base,
            "params_m": count_params(models[n]) / 1e6,
            "gmacs": macs[n] / 1e9,
            "img_s": records[n].img_s,
            "p50_ms": records[n].p50_ms,
            "p90_ms": records[n].p90_ms,
            "speedup": speedup,
            "flops_speedup": flops_speedup,
            "efficiency": speedup / flops_speedup,
        })
    df = pd.DataFrame(rows)
    df.attrs["records"] = records
    return df
