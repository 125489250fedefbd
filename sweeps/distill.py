"""Distil one SiT candidate from its teacher on Ray Train (DDP; one CPU or many GPU nodes).

    python sweeps/distill.py --smoke-test                                   # < 1 min on 2 cores
    python sweeps/distill.py --preset fmnist-cpu --schedule 2,4@0.5 --lambda-token 1
    python sweeps/distill.py --preset deit-small-imagenet --data /data/imagenet \\
        --teacher-checkpoint deit_small.pth --workers 8 --gpu --out /mnt/shared/runs   # on a cluster

The teacher is the job's local checkpoint, or trained here (plain backbone) and cached by the hash
of its config, so the second run reuses it. Rerunning with the same --name and --out resumes from
the last epoch checkpoint; Ray restarts failed workers from it too (--max-failures).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

if __package__ in (None, ""):  # `python sweeps/distill.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sweeps.cli import doc_parser
from sit_core.config import DistillJob
from sit_core.data import DataError, check_data
from sit_core.loss import FRDLoss
from sit_core.presets import PRESETS, get_preset, smoke
from sit_core.schedule import as_schedule


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """Flags that edit the preset's DistillJob (shared with pareto.py)."""
    p.add_argument("--preset", default="fmnist-cpu", choices=sorted(PRESETS),
                   help="starting configuration (default: %(default)s, Fashion-MNIST on CPU)")
    p.add_argument("--data", metavar="DIR", help="IDX directory (Fashion-MNIST layout) or ImageNet-style folder root")
    p.add_argument("--teacher-checkpoint", metavar="FILE",
                   help="local teacher weights; default: train the teacher once and cache it")
    p.add_argument("--epochs", type=int, help="distillation epochs (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="global batch size, split over the workers")
    p.add_argument("--lr", type=float, help="backbone learning rate (RTSMs use 5x)")
    p.add_argument("--train-subset", type=int, help="use only this many training images")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers = DDP replicas (default: 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, AMP)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (default: 1, or all when 1 CPU worker)")
    p.add_argument("--out", default="runs", metavar="DIR", help="Ray results, checkpoints, tables (default: ./runs)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="teacher cache (default: $SIT_CACHE_DIR or ~/.cache/sit-pareto)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, a cluster on this node, else local)")
    p.add_argument("--smoke-test", action="store_true", help="tiny model, data subset, a few steps: < 1 min on 2 cores")


def job_from_args(args) -> DistillJob:
    job = get_preset(args.preset)
    if args.data:
        job.data = dataclasses.replace(job.data, root=args.data)
    if args.train_subset is not None:  # 0 must fail DataSpec's check, not be silently ignored
        job.data = dataclasses.replace(job.data, train_subset=args.train_subset)
    if args.teacher_checkpoint:
        job.teacher_checkpoint = os.path.abspath(os.path.expanduser(args.teacher_checkpoint))
    for flag, field in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr")):
        if getattr(args, flag) is not None:
            job.train = dataclasses.replace(job.train, **{field: getattr(args, flag)})
    if args.smoke_test:
        job = smoke(job)
    return job


def validate_job(job: DistillJob) -> None:
    """Everything a user can get wrong, checked before Ray starts: raises ValueError with one line."""
    model = job.model.build()  # schedule vs model: raises ValueError naming the bad value
    FRDLoss(job.loss.lambda_token, job.loss.lambda_logits, job.loss.tau)  # loss weights
    check_data(job.data, num_classes=model.num_classes)
    if job.data.img_size != job.model.kwargs.get("img_size", job.data.img_size):
        raise ValueError(f"data img_size {job.data.img_size} differs from the model's {job.model.kwargs['img_size']}")
    if job.teacher_checkpoint:  # a missing or mismatched teacher file fails here, not after Ray starts
        from sweeps.runner import load_teacher_state  # imports Ray, starts nothing
        load_teacher_state(job, job.teacher_checkpoint)


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    add_job_arguments(p)
    p.add_argument("--schedule", help="slimming schedule 'POSITIONS@KEEP', e.g. 2,4@0.5 or 2,4@0.7,0.5; "
                                      "prefix 'drop:' or 'merge:' for the peers")
    p.add_argument("--reducer", choices=("tsm", "drop", "merge"), help="token reducer (default: tsm)")
    p.add_argument("--lambda-token", type=float, help="weight of the per-block token MSE (default 2.0)")
    p.add_argument("--lambda-logits", type=float, help="weight of the logit KL (default 2.0)")
    p.add_argument("--tau", type=float, help="distillation temperature (default 1.0)")
    p.add_argument("--name", help="run name; reuse it with the same --out to resume")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures Ray recovers from (default: 2)")
    args = p.parse_args(argv)

    try:
        job = job_from_args(args)
        if args.schedule or args.reducer:
            sched = as_schedule(args.schedule or job.model.schedule, reducer=args.reducer)
            job.model = job.model.with_schedule(sched)
        for flag in ("lambda_token", "lambda_logits", "tau"):
            if getattr(args, flag) is not None:
                job.loss = dataclasses.replace(job.loss, **{flag: getattr(args, flag)})
        if args.workers < 1:
            raise ValueError(f"--workers {args.workers} must be >= 1")
        if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
            raise ValueError(f"--cpus-per-worker {args.cpus_per_worker} must be > 0")
        if args.max_failures < 0:
            raise ValueError(f"--max-failures {args.max_failures} must be >= 0")
        validate_job(job)
    except (ValueError, DataError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")

    import ray
    from sweeps.runner import DEFAULT_CACHE, Workers, ensure_teacher, fit, init_ray, load_teacher_state
    from sweeps.speed_probe import probe

    print(init_ray(args.address))
    workers = Workers(args.workers, args.gpu, args.cpus_per_worker or _default_cpus(args.workers, args.gpu))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    teacher = ensure_teacher(job, cache_dir=args.cache_dir or DEFAULT_CACHE, workers=workers, storage_path=out)
    teacher_ref = ray.put(load_teacher_state(job, teacher.path))
    # a fresh run unless --name is reused: Ray Train resumes any run it finds under the same name
    name = args.name or f"distill-{job.model.schedule.reducer}-{job.model.architecture_key()}-{time.strftime('%Y%m%d-%H%M%S')}"
    outcome = fit(job, mode="distill", teacher=teacher_ref, workers=workers, storage_path=out, run_name=name,
                  max_failures=args.max_failures)
    if outcome.status != "ok":
        print(f"distillation stopped: {outcome.failure or outcome.status}", file=sys.stderr)
        return 1
    m = outcome.metrics
    speed = probe(job.model, job.speed)
    print(f"speed ({speed['speed']['protocol']}):\n  teacher {speed['teacher_latency_ms']:.2f} ms/batch, student "
          f"{speed['latency_ms']:.2f} ms/batch ({speed['gmacs']:.4f} GMACs): measured speed-up {speed['speedup']:.2f}x, "
          f"FLOPs-predicted {speed['flops_speedup']:.2f}x")
    print(f"done in {time.time() - t0:.0f}s: {job.model.schedule} val top-1 {m['val_top1']:.2f}% "
          f"test top-1 {m['test_top1']:.2f}% (teacher val {teacher.metrics.get('val_top1', float('nan')):.2f}%) "
          f"loss {m['train_loss']:.4f} [cls {m['train_loss_cls']:.4f} token {m['train_loss_token']:.4f} "
          f"logits {m['train_loss_logits']:.4f}] train {m['train_img_s']:.0f} img/s; weights: {outcome.model_path}")
    return 0


def _default_cpus(num_workers: int, gpu: bool) -> float:
    """One worker gets the whole node's CPUs (torch uses them all); several share them evenly."""
    if gpu:
        return 1.0
    import ray
    return max(1.0, float(int(ray.cluster_resources().get("CPU", 1)) // num_workers))


if __name__ == "__main__":
    sys.exit(main())
