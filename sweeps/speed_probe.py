"""A candidate's latency during a sweep, and its MACs and parameters: the trials' latency oracles.

Both oracles are picklable callables, ModelSpec -> {"latency_ms", "speedup", "gmacs", "params_m", ...},
that a trial calls once before it trains:
  * `LatencyModel` (`--latency model`, the default): looks the candidate up in the backbone's latency
    table (`sit_core.latency`, built once per sweep on the serving node). No timing, no lock: a
    search on a busy node is not disturbed and does not disturb.
  * `Prober` (`--latency measure`): times the candidate end to end on the serving node (a Ray task,
    `serving.ServingTarget`), interleaved with its teacher (docs/method.md "Measuring speed
    honestly": a model against its own baseline, same process), holding that node's `NodeLock`
    exclusively so no training step of a trial on the node runs meanwhile. Cached on disk by (architecture, protocol, device): weights do not change
    speed, so identical architectures are measured once per sweep.
Either way the front is confirmed end to end at the end of the sweep (`sweep.confirm_front`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from sit_core.config import ModelSpec, SpeedSpec, stable_hash
from sit_core.files import atomic_write_text
from sit_core.flops import count_macs, count_params
from sit_core.latency import LatencyTable, input_shape
from sit_core.speed import compare, device_name, node_threads, speedup

from .node_lock import NodeLock

PROBE_ROUNDS = 3  # interleaved rounds of a per-trial probe (the spec's iterations spread over them)


def static_costs(spec: ModelSpec) -> dict:
    """GMACs (one image) and parameters (millions) of the inference model: no clock involved."""
    model = spec.build(pretrained=False).eval()
    in_chans, img_size = input_shape(spec)
    return {"gmacs": count_macs(model, img_size, in_chans) / 1e9, "params_m": count_params(model) / 1e6}


def probe(spec: ModelSpec, speed: SpeedSpec, *, cache_dir: Optional[str] = None,
          lock: Optional[NodeLock] = None) -> dict:
    """{"latency_ms", "img_s", "gmacs", "params_m", "speedup", "speed": SpeedRecord dict, "cached": bool},
    timed here, on `speed.device`."""
    threads = speed.threads or (node_threads() if speed.device == "cpu" else None)
    key = stable_hash({"arch": spec.to_dict(), "speed": dataclasses.asdict(speed), "threads": threads,
                       "device": device_name(speed.device)})
    path = Path(cache_dir, f"{key}.json") if cache_dir else None
    if path is not None and path.exists():
        return {**json.loads(path.read_text()), "cached": True}

    student = spec.build(pretrained=False).eval()
    teacher = spec.teacher().build(pretrained=False).eval()
    in_chans, img_size = input_shape(spec)
    with (lock or NodeLock()).exclusive():
        records = compare({"teacher": teacher, "student": student}, batch_size=speed.batch_size,
                          img_size=img_size, in_chans=in_chans, device=speed.device, dtype=getattr(torch, speed.dtype),
                          warmup=speed.warmup, iters=max(1, speed.iters // PROBE_ROUNDS), rounds=PROBE_ROUNDS,
                          threads=threads)
    record, teacher_record = records["student"], records["teacher"]
    macs = {n: count_macs(m, img_size, in_chans) for n, m in (("student", student), ("teacher", teacher))}
    result = {
        "latency_ms": record.p50_ms, "latency_ms_std": record.std_ms, "latency_ms_p90": record.p90_ms,
        "img_s": record.img_s, "gmacs": macs["student"] / 1e9, "params_m": count_params(student) / 1e6,
        "teacher_latency_ms": teacher_record.p50_ms, "speedup": speedup(records, "student", "teacher"),
        "flops_speedup": macs["teacher"] / macs["student"],
        "speed": {**record.to_dict(), "protocol": record.protocol()}, "arch_key": spec.architecture_key(),
    }
    if path is not None:
        atomic_write_text(path, json.dumps(result, indent=1))
    return {**result, "cached": False}


class LatencyModel:
    """`--latency model`: predicted latency from the sweep's latency table (see the module docstring)."""

    mode = "model"

    def __init__(self, table: LatencyTable):
        self.table = table
        self.teacher_ms = table.predict("none")

    def __call__(self, spec: ModelSpec) -> dict:
        ms = self.table.predict_spec(spec)
        return {"latency_ms": ms, "speedup": self.teacher_ms / ms, **static_costs(spec)}


class Prober:
    """`--latency measure`: each candidate timed end to end on the serving node when asked."""

    mode = "measure"

    def __init__(self, target, cache_dir: Optional[str] = None):
        self.target, self.cache_dir = target, cache_dir  # target: serving.ServingTarget

    def __call__(self, spec: ModelSpec) -> dict:
        result = self.target.call(probe, spec, self.target.speed, cache_dir=self.cache_dir)
        return {k: result[k] for k in ("latency_ms", "latency_ms_std", "gmacs", "params_m", "speedup")}
