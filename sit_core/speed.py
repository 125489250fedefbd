"""The timing protocol: one for every model, every latency table entry and every confirmation.

docs/method.md "Measuring speed honestly", as ToMe's `benchmark()`: eval mode, inference mode,
fixed batch and resolution, seeded random input, warm-up discarded, the device synchronised before
every clock read, each iteration timed on its own. Speed is a ratio to a baseline timed in the
same process, interleaved: `compare` runs every model in rounds, rotating who goes first, so drift
(other jobs, clocks, heat) lands on all alike, and returns one `SpeedRecord` per model whose
`protocol()` says how it was measured. Models and torch's thread count are left as found.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .flops import ImgSize, ModuleTypes, eval_mode, hw, outermost

WARMUP = 10  # discarded once per model: allocator, oneDNN/cuDNN autotuning, caches, clocks
ITERS = 50   # timed iterations per model, each timed on its own
SEED = 0     # every model sees the same input tensor


def as_device(device: Union[str, torch.device]) -> torch.device:
    """"cuda" and "cuda:0" compare equal (or a model is moved for nothing)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device: Union[str, torch.device] = "cpu") -> str:
    """The GPU's name, or the CPU model and its logical core count."""
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return f"{name or platform.processor() or platform.machine() or 'unknown cpu'} ({os.cpu_count()} logical cpus)"


def node_threads() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return torch.mps.synchronize if device.type == "mps" else (lambda: None)  # CPU ops are synchronous


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """fp32 runs plain; bf16 / fp16 run as AMP (weights fp32, matmuls low precision), as models serve."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def interleaved(calls: Mapping[str, Callable[[], Any]], *, device: torch.device, dtype: torch.dtype,
                warmup: int, iters: Union[int, Mapping[str, int]], rounds: int,
                progress: Optional[Callable[[int, int], None]] = None) -> dict[str, list[float]]:
    """Seconds per call of every callable: `warmup` discarded calls each, then `rounds` rounds that
    time each callable `iters` times (one number, or one per callable), the starting callable rotated
    every round. The first call of a round finds caches holding another's data, as a layer does inside
    a model; medians and percentiles over the rounds are the result. `progress(round, rounds)` after
    each round."""
    sync, names = _sync(device), list(calls)
    per = {n: iters[n] for n in names} if isinstance(iters, Mapping) else dict.fromkeys(names, iters)
    if min(per.values(), default=1) < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"need iters >= 1, rounds >= 1 and warmup >= 0, got {iters}, {rounds}, {warmup}")
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode(), autocast(device, dtype):
        for n in names:
            for _ in range(warmup):
                calls[n]()
        sync()
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                for _ in range(per[n]):
                    t0 = time.perf_counter()
                    calls[n]()
                    sync()  # a CUDA call returns before the GPU is done: wait before reading the clock
                    samples[n].append(time.perf_counter() - t0)
            if progress is not None:
                progress(r + 1, rounds)
    return samples


@dataclass(frozen=True)
class SpeedRecord:
    """One model's timing and everything needed to reproduce it."""

    img_s: float          # batch_size * samples / total timed seconds
    mean_ms: float        # per-batch latency over the timed iterations
    std_ms: float
    min_ms: float
    p25_ms: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    samples: int          # timed iterations in all
    warmup: int           # discarded once before the first round
    rounds: int           # interleaved rounds whose samples are pooled (1: measured alone)
    batch_size: int
    img_size: tuple[int, int]
    in_chans: int
    device: str           # "cpu", "cuda:0", ...
    device_name: str      # GPU name or CPU model
    dtype: str            # float32 = plain fp32; bfloat16 / float16 = autocast (AMP)
    threads: int          # torch intra-op threads during the run
    torch_version: str
    timm_version: str
    python_version: str

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    def to_dict(self) -> dict:
        return asdict(self)

    def protocol(self) -> str:
        h, w = self.img_size
        timing = f"{self.warmup} warm-up discarded + {self.samples} timed iters"
        if self.rounds > 1:
            timing = (f"{self.warmup} warm-up discarded, then {self.rounds} rounds interleaved with the other "
                      f"models x {self.samples // self.rounds} timed iters")
        return (f"{self.device_name} [{self.device}], {self.dtype}{'' if self.dtype == 'float32' else ' (autocast)'}, "
                f"batch {self.batch_size}, {self.in_chans}x{h}x{w}, {self.threads} threads, eval + inference_mode, "
                f"seeded random input, {timing} (each iteration synced and timed separately); torch "
                f"{self.torch_version}, timm {self.timm_version}, python {self.python_version}")


def record(samples: Sequence[float], *, warmup: int, rounds: int, batch_size: int, img_size: ImgSize,
           in_chans: int, device: torch.device, dtype: torch.dtype, threads: int) -> SpeedRecord:
    import timm

    ms = np.asarray(samples, dtype=np.float64) * 1e3
    p25, p50, p75, p90, p99 = np.percentile(ms, [25, 50, 75, 90, 99])
    return SpeedRecord(
        img_s=float(batch_size * len(ms) / (ms.sum() / 1e3)), mean_ms=float(ms.mean()),
        std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, min_ms=float(ms.min()), p25_ms=float(p25),
        p50_ms=float(p50), p75_ms=float(p75), p90_ms=float(p90), p99_ms=float(p99), samples=len(ms),
        warmup=warmup, rounds=rounds, batch_size=batch_size, img_size=hw(img_size), in_chans=in_chans,
        device=str(device), device_name=device_name(device), dtype=str(dtype).removeprefix("torch."),
        threads=threads, torch_version=torch.__version__, timm_version=timm.__version__,
        python_version=platform.python_version())


@contextlib.contextmanager
def bench_setup(models: Sequence[nn.Module], device: torch.device, threads: Optional[int]) -> Iterator[int]:
    """Every model in eval mode on `device` and torch at `threads`; yields the thread count in use.
    Devices, modes and threads are restored after."""
    old_threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        moved = []
        stack.callback(torch.set_num_threads, old_threads)
        for m in models:
            p = next(iter(m.parameters()), None)
            if p is not None and p.device != device:
                moved.append((m, p.device))
                m.to(device)
            stack.enter_context(eval_mode(m))
        stack.callback(lambda: [m.to(d) for m, d in moved])
        if threads is not None:
            torch.set_num_threads(threads)
        yield torch.get_num_threads()


def random_input(batch_size: int, img_size: ImgSize, in_chans: int, device: torch.device,
                 seed: int = SEED) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # drawn on CPU: the same tensor on every device
    return torch.randn(batch_size, in_chans, *hw(img_size), generator=g).to(device)


def compare(models: Mapping[str, nn.Module], *, batch_size: int, img_size: ImgSize, in_chans: int = 3,
            device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32, warmup: int = 3,
            iters: int = 10, rounds: int = 3, threads: Optional[int] = None,
            seed: int = SEED) -> dict[str, SpeedRecord]:
    """Time every model in this process on one seeded input, interleaved (see `interleaved`).
    Ratios between the records are the result: `speedup(records, name, baseline)`."""
    device = as_device(device)
    with bench_setup(list(models.values()), device, threads) as used:
        x = random_input(batch_size, img_size, in_chans, device, seed)
        samples = interleaved({n: (lambda m=m: m(x)) for n, m in models.items()}, device=device, dtype=dtype,
                              warmup=warmup, iters=iters, rounds=rounds)
    return {n: record(s, warmup=warmup, rounds=rounds, batch_size=batch_size, img_size=img_size, in_chans=in_chans,
                      device=device, dtype=dtype, threads=used) for n, s in samples.items()}


def speedup(records: Mapping[str, SpeedRecord], name: str, baseline: str) -> float:
    """img/s of `name` over its baseline's, both from one `compare`."""
    return records[name].img_s / records[baseline].img_s


def measure_speed(model: nn.Module, *, batch_size: int, img_size: ImgSize, in_chans: int = 3,
                  device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                  warmup: int = WARMUP, iters: int = ITERS, threads: Optional[int] = None,
                  seed: int = SEED) -> SpeedRecord:
    """One model alone: `warmup` discarded, then `iters` timed forwards."""
    return compare({"model": model}, batch_size=batch_size, img_size=img_size, in_chans=in_chans, device=device,
                   dtype=dtype, warmup=warmup, iters=iters, rounds=1, threads=threads, seed=seed)["model"]


def module_time_share(model: nn.Module, module_types: ModuleTypes, *, batch_size: int, img_size: ImgSize,
                      in_chans: int = 3, device: Union[str, torch.device] = "cpu",
                      dtype: torch.dtype = torch.float32, warmup: int = 3, iters: int = 5,
                      threads: Optional[int] = None, seed: int = SEED) -> float:
    """Share of forward wall time inside modules of `module_types` (e.g. the TSMs), in [0, 1].

    Hooks sync and read the clock around each outermost such module; they cost microseconds and on
    a GPU stop kernels overlapping at the boundary: an estimate of the share, not a speed number.
    0.0 without running when the model has no such module.
    """
    targets = outermost(model, module_types)
    if not targets:
        return 0.0
    device = as_device(device)
    sync, inside, started = _sync(device), [0.0], {}

    def pre(mod, args):
        sync()
        started[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        sync()
        inside[0] += time.perf_counter() - started.pop(id(mod))

    handles = [h for _, m in targets for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with bench_setup([model], device, threads):
            x = random_input(batch_size, img_size, in_chans, device, seed)
            interleaved({"m": lambda: model(x)}, device=device, dtype=dtype, warmup=warmup, iters=1, rounds=1)
            inside[0] = 0.0  # warm-up time inside the modules does not count
            total = sum(interleaved({"m": lambda: model(x)}, device=device, dtype=dtype, warmup=0, iters=iters,
                                    rounds=1)["m"])
    finally:
        for h in handles:
            h.remove()
    return min(1.0, inside[0] / total) if total > 0 else 0.0
