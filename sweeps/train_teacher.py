"""Train a preset's teacher (the plain backbone) on Ray Train, and record it beside its weights.

    python sweeps/train_teacher.py --preset fmnist-cpu            # into the cache (~/.cache/sit-pareto)
    python sweeps/train_teacher.py --preset fmnist-cpu --ship     # into sit_core/weights/ (committed)

The record (`<weights>.json`) holds this command, the config hash (`DistillJob.teacher_key()`:
architecture + data + recipe), the data, the measured validation and test top-1 and the weights'
sha256; loading checks the hash. Sweeps find a teacher by its config hash: the shipped one first,
then the cache, and only then train one.
"""
from __future__ import annotations

import os
import shlex
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sit_core import teachers
from sweeps.cli import add_job_arguments, doc_parser, job_from_args, parse_or_exit, validate_job


def build_parser():
    p = doc_parser(__doc__)
    add_job_arguments(p)
    p.add_argument("--ship", action="store_true", help=f"write into {teachers.SHIPPED_DIR} (to commit) instead of the cache")
    p.add_argument("--out", default="runs/teacher", metavar="DIR", help="Ray Train storage (default: %(default)s)")
    return p


def make_job(args):
    job = job_from_args(args)
    validate_job(job)
    return job


def main(argv=None) -> int:
    args, job = parse_or_exit(build_parser(), make_job, argv)
    from sweeps.runner import init_ray, size_workers, train_teacher

    print(init_ray(args.address))
    workers = size_workers(args.workers, args.gpu, args.cpus_per_worker)
    name = f"{args.preset}-teacher.pt" if args.ship else teachers.cached_path(job).name
    dest = (teachers.SHIPPED_DIR if args.ship else teachers.cached_path(job).parent) / name
    command = "python sweeps/train_teacher.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    record = train_teacher(job, workers=workers, storage=os.path.abspath(args.out), dest=dest, command=command,
                           preset=args.preset, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    print(f"teacher {record.path}: val top-1 {record.metrics.get('val_top1', float('nan')):.2f}%, "
          f"test top-1 {record.metrics.get('test_top1', float('nan')):.2f}% (config {record.key}, "
          f"sha256 {record.info['sha256'][:12]}..., {record.info['train_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
