"""Latency of a candidate architecture, measured alone on the node and measured once.

The probe takes the node's `NodeLock` exclusively, so no training step of any trial on this node
runs while it times the model, and caches the record on disk by (architecture, protocol, device):
weights do not change speed, so identical architectures are measured once per sweep. The student
is timed interleaved with its teacher (SPEC: compare a model with its own baseline measured in the
same process), so each record also carries a drift-resistant speed-up.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import torch

from sit_core.config import ModelSpec, SpeedSpec, stable_hash
from sit_core.flops import count_macs, count_params
from sit_core.speed import compare, device_name, node_threads, speedup
from sit_core.schedule import SlimSchedule

from .node_lock import NodeLock


def probe_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def probe(spec: ModelSpec, speed: SpeedSpec, *, cache_dir: Optional[str] = None, device: Optional[str] = None,
          lock: Optional[NodeLock] = None) -> dict:
    """{"latency_ms", "img_s", "gmacs", "params_m", "speed": SpeedRecord dict, "cached": bool}."""
    device = device or probe_device()
    threads = speed.threads or (node_threads() if device == "cpu" else None)
    key = stable_hash({"arch": spec.to_dict(), "speed": dataclasses.asdict(speed), "threads": threads,
                       "device": device_name(device)})
    path = Path(cache_dir, f"{key}.json") if cache_dir else None
    if path is not None and path.exists():
        return {**json.loads(path.read_text()), "cached": True}

    student = spec.build().eval()
    teacher = spec.with_schedule(SlimSchedule(reducer="none")).build().eval()
    img_size = tuple(student.patch_embed.img_size)
    in_chans = int(spec.kwargs.get("in_chans", 3))
    rounds = 3
    with (lock or NodeLock()).exclusive():
        records = compare({"teacher": teacher, "student": student}, batch_size=speed.batch_size,
                          img_size=img_size, in_chans=in_chans, device=device, dtype=getattr(torch, speed.dtype),
                          warmup=speed.warmup, iters=max(1, speed.iters // rounds), rounds=rounds, threads=threads)
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)
    return {**result, "cached": False}


class Prober:
    """`--latency measure`: a latency oracle that times each candidate end to end when asked (alone
    on the node, interleaved with its teacher, cached by architecture). Picklable into trials."""

    mode = "measure"

    def __init__(self, speed: SpeedSpec, cache_dir: Optional[str] = None):
        self.speed, self.cache_dir = speed, cache_dir

    def __call__(self, spec: ModelSpec) -> dict:
        result = probe(spec, self.speed, cache_dir=self.cache_dir)
        return {k: result[k] for k in ("latency_ms", "latency_ms_std", "gmacs", "params_m", "speedup")}
