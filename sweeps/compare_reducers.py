"""Benchmark: SiT (TSM + FRD) vs hard drop vs merge at the same schedules and training budget.

    python sweeps/compare_reducers.py                      # Fashion-MNIST CPU preset, ~10 min on 2 cores
    python sweeps/compare_reducers.py --epochs 3 --workers 1

Every reducer is distilled from the same cached teacher with the same recipe (the preset's sweep
trial budget unless --epochs/--max-steps say otherwise) and FRD loss (the
peers get the same RTSM feature distillation, so only the reducer differs), at a mild schedule
(~1.7x fewer MACs) and an aggressive one (~3.5x). Prints top-1 as a fraction of the teacher's,
MACs, and the measured speed-up next to the FLOPs-predicted one. A benchmark, not a test.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd

from sweeps.cli import doc_parser
from sit_core.presets import PRESETS, get_preset
from sit_core.schedule import SlimSchedule

# MAC reductions measured with sit_core.measure.count_macs on the fmnist-cpu ViT (6 blocks, 64 tokens).
SCHEDULES = {"mild": "2,4@0.5", "aggressive": "1,2,3@0.35"}


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    p.add_argument("--preset", default="fmnist-cpu", choices=sorted(PRESETS))
    p.add_argument("--epochs", type=int, help="distillation epochs (default: the preset's)")
    p.add_argument("--reducers", default="tsm,drop,merge")
    p.add_argument("--max-steps", type=int, help="steps per epoch (default: the preset's cap)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, help="default: the node's CPUs split over the workers")
    p.add_argument("--out", default="runs/compare_reducers")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)

    import ray
    from sweeps.runner import DEFAULT_CACHE, Workers, ensure_teacher, fit, init_ray, load_teacher_state
    from sweeps.speed_probe import probe

    job = get_preset(args.preset)
    job.train = dataclasses.replace(job.train, epochs=args.epochs or job.train.epochs,
                                    max_steps_per_epoch=args.max_steps or job.train.max_steps_per_epoch)
    print(init_ray())
    workers = Workers(args.workers, False,
                      args.cpus_per_worker or max(1.0, ray.cluster_resources().get("CPU", 1) // args.workers))
    out = os.path.abspath(args.out)
    teacher = ensure_teacher(job, cache_dir=args.cache_dir or DEFAULT_CACHE, workers=workers, storage_path=out)
    ref = ray.put(load_teacher_state(job, teacher.path))
    t_top1 = teacher.metrics["val_top1"]
    rows = []
    for label, text in SCHEDULES.items():
        for reducer in args.reducers.split(","):
            cand = dataclasses.replace(job, name=f"{reducer}-{label}")
            cand.model = job.model.with_schedule(SlimSchedule.parse(text, reducer=reducer))
            t0 = time.time()
            outcome = fit(cand, mode="distill", teacher=ref, workers=workers, storage_path=out,
                          run_name=f"{reducer}-{label}-{int(t0)}", probe_lock=False)
            speed = probe(cand.model, cand.speed)
            m = outcome.metrics
            rows.append({"schedule": f"{label} ({text})", "reducer": reducer, "val_top1": m.get("val_top1"),
                         "test_top1": m.get("test_top1"), "of_teacher": m.get("val_top1", float("nan")) / t_top1,
                         "gmacs": speed["gmacs"], "flops_speedup": speed["flops_speedup"],
                         "measured_speedup": speed["speedup"], "train_s": sum(h.get("train_s", 0) for h in outcome.history),
                         "status": outcome.status})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(f"\nteacher: val top-1 {t_top1:.2f}% test top-1 {teacher.metrics.get('test_top1', float('nan')):.2f}% "
          f"({job.model.backbone} {job.model.kwargs}); recipe {dataclasses.asdict(job.train)}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"speed protocol: {speed['speed']['protocol']} (student and teacher interleaved, p50 latency ratio)")
    os.makedirs(out, exist_ok=True)
    table.to_csv(os.path.join(out, "compare_reducers.csv"), index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
