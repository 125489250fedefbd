"""Search the speed/accuracy Pareto front of SiT candidates: Ray Tune + Optuna, MLflow, cards.

    python sweeps/pareto.py                         # local: Fashion-MNIST preset, <= 10 min on 2 cores
    python sweeps/pareto.py --smoke-test            # < 2 min
    python sweeps/pareto.py --resume                # continue a killed sweep (same --out / --name)
    ray job submit --working-dir . -- python sweeps/pareto.py --preset deit-small-imagenet \\
        --data /mnt/shared/imagenet --teacher-checkpoint /mnt/shared/deit_small.pth \\
        --workers 4 --gpu --out /mnt/shared/runs/deit-s --tracking-uri http://HEAD:5000   # on a cluster

Every trial distils one sampled candidate (schedule, keep ratios, loss weights, lr) from the
teacher on Ray Train, then measures its latency with sit_core's protocol while no other trial on
the node trains (a per-node lock; identical architectures are measured once). Objectives default
to maximising validation top-1 and minimising latency; trials over --max-latency-ms or under
--min-top1 are infeasible and never on the front. Each trial is a nested MLflow run under the
sweep's parent run; the front is exported as cards (sit_core.load_card rebuilds the model).
Limits: Optuna only sees each trial's final result (no early stopping); on a multi-node cluster
--out must be shared storage and --tracking-uri a server.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python sweeps/pareto.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sweeps.cli import doc_parser
from sit_core.data import DataError

from sweeps.distill import add_job_arguments, job_from_args, validate_job

DEFAULT_TRIALS = 6            # the embedded default: a front of several points in <= 10 min on 2 cores
SMOKE_TRIALS = 3
OBJECTIVE_CHOICES = {"top1": "max", "latency_ms": "min", "gmacs": "min"}


def parse_objectives(text: str) -> dict:
    objectives = {}
    for part in text.split(","):
        name, _, mode = part.strip().partition(":")
        if name not in OBJECTIVE_CHOICES:
            raise ValueError(f"objective {name!r} is not one of {', '.join(OBJECTIVE_CHOICES)}")
        mode = mode or OBJECTIVE_CHOICES[name]
        if mode not in ("max", "min"):
            raise ValueError(f"objective {name}:{mode} must be max or min")
        objectives[name] = mode
    if len(objectives) < 2 or "top1" not in objectives or "latency_ms" not in objectives:
        raise ValueError("objectives must include top1 and latency_ms (gmacs may be a third)")
    return objectives


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(__doc__)
    add_job_arguments(p)
    p.set_defaults(out="runs/pareto")
    p.add_argument("--trials", type=int, help=f"trials to run (default: {DEFAULT_TRIALS}, smoke: {SMOKE_TRIALS})")
    p.add_argument("--concurrent", type=int, help="trials at once (default: fitted to the cluster's CPUs/GPUs)")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "nsga2", "random"),
                   help="Optuna multi-objective sampler (default: %(default)s)")
    p.add_argument("--objectives", default="top1:max,latency_ms:min",
                   help="comma list of top1, latency_ms, gmacs with :max/:min (default: %(default)s)")
    p.add_argument("--reducers", default="tsm", help="token reducers competing on the front: any of tsm,drop,merge")
    p.add_argument("--max-latency-ms", type=float, help="latency budget: slower trials are infeasible")
    p.add_argument("--min-top1", type=float, help="accuracy floor (%%): less accurate trials are infeasible")
    p.add_argument("--no-warm-start", action="store_true", help="skip the paper's configurations as first trials")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite in --out)")
    p.add_argument("--name", default=None, help="sweep name (default: pareto-<preset>); reuse with --resume")
    p.add_argument("--resume", action="store_true", help="continue the sweep of this --out/--name")
    p.add_argument("--export", default="front", help="cards to write: front | knee | budget:<ms> (default: front)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        plan = make_plan(args)
    except (ValueError, DataError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")  # before anything is written or Ray starts
    from sweeps.sweep import run_sweep
    try:
        return run_sweep(plan)
    except ValueError as e:  # what only the running cluster can tell (e.g. trials that cannot fit)
        p.exit(2, f"{p.prog}: error: {e}\n")


@dataclasses.dataclass
class Plan:
    """Everything the sweep needs, validated."""

    job: object
    name: str
    out: str
    tracking_uri: str
    trials: int
    concurrent: int | None
    sampler: str
    objectives: dict
    reducers: tuple
    max_latency_ms: float | None
    min_top1: float | None
    warm_start: bool
    resume: bool
    export: str
    seed: int
    workers: int
    gpu: bool
    cpus_per_worker: float | None
    cache_dir: str | None
    address: str | None


def make_plan(args) -> Plan:
    from sweeps import tracking

    job = job_from_args(args)
    validate_job(job)
    trials = args.trials if args.trials is not None else (SMOKE_TRIALS if args.smoke_test else DEFAULT_TRIALS)
    if trials < 1:
        raise ValueError(f"--trials {trials} must be >= 1")
    if args.concurrent is not None and args.concurrent < 1:
        raise ValueError(f"--concurrent {args.concurrent} must be >= 1")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be >= 1")
    if args.cpus_per_worker is not None and not args.cpus_per_worker > 0:
        raise ValueError(f"--cpus-per-worker {args.cpus_per_worker} must be > 0")
    if args.max_latency_ms is not None and not args.max_latency_ms > 0:
        raise ValueError(f"--max-latency-ms {args.max_latency_ms} must be > 0")
    if args.min_top1 is not None and not 0 <= args.min_top1 <= 100:
        raise ValueError(f"--min-top1 {args.min_top1} must be a percentage in 0..100")
    reducers = tuple(r.strip() for r in args.reducers.split(",") if r.strip())
    bad = [r for r in reducers if r not in ("tsm", "drop", "merge")]
    if bad or not reducers:
        raise ValueError(f"--reducers {args.reducers!r}: choose from tsm, drop, merge")
    if args.export != "front" and args.export != "knee" and not args.export.startswith("budget:"):
        raise ValueError(f"--export {args.export!r} must be front, knee or budget:<ms>")
    if args.export.startswith("budget:"):
        try:
            budget = float(args.export.split(":", 1)[1])
        except ValueError:
            budget = float("nan")
        if not budget > 0:
            raise ValueError(f"--export {args.export!r}: the budget must be a latency in ms > 0, e.g. budget:12.5")
    out = os.path.abspath(args.out)
    name = args.name or f"pareto-{args.preset}{'-smoke' if args.smoke_test else ''}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        # it names a directory, a Tune experiment and an MLflow tag matched in filters (no quotes)
        raise ValueError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    sweep_dir = Path(out, "ray", name)
    if args.resume and not sweep_dir.exists():
        raise ValueError(f"nothing to resume: no sweep {name!r} in {out}")
    if not args.resume and sweep_dir.exists():
        raise ValueError(f"sweep {name!r} already exists in {out}: pass --resume to continue it, "
                         "or choose another --name/--out")
    return Plan(job=job, name=name, out=out, tracking_uri=tracking.resolve_tracking_uri(args.tracking_uri, out),
                trials=trials, concurrent=args.concurrent, sampler=args.sampler,
                objectives=parse_objectives(args.objectives), reducers=reducers,
                max_latency_ms=args.max_latency_ms, min_top1=args.min_top1, warm_start=not args.no_warm_start,
                resume=args.resume, export=args.export, seed=args.seed, workers=args.workers, gpu=args.gpu,
                cpus_per_worker=args.cpus_per_worker, cache_dir=args.cache_dir, address=args.address)


if __name__ == "__main__":
    sys.exit(main())
