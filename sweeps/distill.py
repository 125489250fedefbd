"""Distil one SiT candidate from its teacher on Ray Train (DDP; one CPU or many GPU nodes).

    python sweeps/distill.py --smoke-test                                   # < 1 min on 2 cores
    python sweeps/distill.py --preset fmnist-cpu --schedule 2,4@0.5 --lambda-token 1
    python sweeps/distill.py --config my_job.yaml --lr 5e-4                 # a job file, a flag on top
    python sweeps/distill.py --model deit3_small_patch16_224 --num-classes 37 --data pets \
        --teacher-checkpoint my_deit3.pth --finetune-teacher 3 --schedule 3,6,9@0.7      # your own ViT
    python sweeps/distill.py --preset deit-small-imagenet --data /data/imagenet \\
        --teacher-checkpoint deit_small.pth --workers 8 --gpu --out /mnt/shared/runs   # on a cluster

The teacher is the job's local checkpoint, the shipped one (the default preset), or trained here
(plain backbone) and cached by the hash of its config. Rerunning with the same --name and --out
resumes from the last epoch checkpoint; Ray restarts failed workers from it too (--max-failures).
"""
from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # `python sweeps/distill.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sit_core.config import override
from sit_core.schedule import as_schedule
from sweeps.cli import add_job_arguments, doc_parser, job_from_args, job_yaml, parse_or_exit, validate_job


def build_parser():
    p = doc_parser(__doc__)
    add_job_arguments(p)
    p.add_argument("--schedule", help="slimming schedule 'POSITIONS@KEEP', e.g. 2,4@0.5 or 2,4@0.7,0.5; "
                                      "prefix 'drop:' or 'merge:' for the peers")
    p.add_argument("--reducer", choices=("tsm", "drop", "merge"), help="token reducer (default: tsm)")
    p.add_argument("--out", default="runs", metavar="DIR|URI", help="Ray results and checkpoints: a directory "
                   "(shared by every node on a cluster) or an s3://, gs:// URI (default: ./runs)")
    p.add_argument("--shared-out", action="store_true", help="confirm that every node of the cluster mounts the "
                   "local --out directory (needed when the autoscaler can add nodes and --out is not a network mount)")
    p.add_argument("--name", help="run name; reuse it with the same --out to resume")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures Ray recovers from (default: 2)")
    return p


def make_job(args):
    job = job_from_args(args)
    if args.schedule or args.reducer:
        job = override(job, {"model.schedule": as_schedule(args.schedule or job.model.schedule, reducer=args.reducer)})
    if args.max_failures < 0:
        raise ValueError(f"--max-failures {args.max_failures} must be >= 0")
    if not args.print_config:
        validate_job(job)
    return job


def main(argv=None) -> int:
    args, job = parse_or_exit(build_parser(), make_job, argv)
    if args.print_config:
        print(job_yaml(job), end="")
        return 0
    from sweeps import storage
    from sweeps.runner import Session
    from sweeps.speed_probe import probe

    out = storage.normalise(args.out)  # a directory, or an s3:// / gs:// URI Ray Train writes to
    t0 = time.time()
    try:
        session = Session.start(job, storage=out, workers=args.workers, gpu=args.gpu,
                                cpus_per_worker=args.cpus_per_worker, address=args.address,
                                before_teacher=lambda cap: storage.check_shared_out(out, cap, confirmed=args.shared_out))
    except ValueError as e:  # what only the running cluster can tell (a request it can never satisfy)
        build_parser().exit(2, f"{os.path.basename(sys.argv[0])}: error: {e}\n")
    # a fresh run unless --name is reused: Ray Train resumes any run it finds under the same name
    name = args.name or f"distill-{job.model.schedule.reducer}-{job.model.architecture_key()}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        outcome = session.distill(job, name, max_failures=args.max_failures)
    finally:
        session.release()
    if outcome.status != "ok":
        print(f"distillation stopped: {outcome.failure or outcome.status}", file=sys.stderr)
        return 1
    m = outcome.metrics
    speed = probe(job.model, job.speed)
    print(f"speed ({speed['speed']['protocol']}):\n  teacher {speed['teacher_latency_ms']:.2f} ms/batch, student "
          f"{speed['latency_ms']:.2f} ms/batch ({speed['gmacs']:.4f} GMACs): measured speed-up {speed['speedup']:.2f}x, "
          f"FLOPs-predicted {speed['flops_speedup']:.2f}x")
    print(f"done in {time.time() - t0:.0f}s: {job.model.schedule} val top-1 {m['val_top1']:.2f}% "
          f"test top-1 {m['test_top1']:.2f}% (teacher val {session.teacher.metrics.get('val_top1', float('nan')):.2f}%) "
          f"loss {m['train_loss']:.4f} [cls {m['train_loss_cls']:.4f} token {m['train_loss_token']:.4f} "
          f"logits {m['train_loss_logits']:.4f}] train {m['train_img_s']:.0f} img/s; weights: {outcome.weights_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
