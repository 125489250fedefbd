"""What every command-line script shares: a parser whose --help is the script's docstring, the flags
that edit a `DistillJob` (all applied through `sit_core.config.override`), and the up-front checks
that turn a user's mistake into one line and exit status 2 before Ray starts."""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional

import yaml

from sit_core.config import DistillJob, override
from sit_core.presets import PRESETS, get_preset, smoke


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """First paragraph of `doc` as the description, the rest (usage examples, limits) as the epilog."""
    summary, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(description=summary, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


# flag -> (job field, type, help). One table: the parser, --help and the override come from it.
JOB_FLAGS = {
    "--epochs": ("train.epochs", positive_int, "distillation epochs (default: the preset's)"),
    "--batch-size": ("train.batch_size", positive_int, "global batch size, split over the workers"),
    "--lr": ("train.lr", finite_float, "backbone learning rate (RTSMs start at 5x)"),
    "--max-steps": ("train.max_steps_per_epoch", positive_int, "cap on optimiser steps per epoch"),
    "--device-batch-cap": ("train.device_batch_cap", positive_int,
                           "most images per forward on one device; gradients accumulate over the rest"),
    "--lambda-token": ("loss.lambda_token", finite_float, "weight of the per-block token MSE (default 2.0)"),
    "--lambda-logits": ("loss.lambda_logits", finite_float, "weight of the logit KL (default 2.0)"),
    "--tau": ("loss.tau", finite_float, "distillation temperature (default 1.0)"),
    "--train-subset": ("data.train_subset", positive_int, "use only this many training images"),
    "--val-subset": ("data.val_subset", positive_int, "score validation top-1 on this many held-out images"),
    "--speed-batch": ("speed.batch_size", positive_int, "batch size latency is modelled and measured at "
                                                       "(1: online serving, 64: throughput)"),
    "--speed-threads": ("speed.threads", positive_int, "CPU threads for latency (default: the preset's)"),
    "--speed-device": ("speed.device", str, "device the model serves on: cpu | cuda (default: the preset's)"),
    "--speed-dtype": ("speed.dtype", str, "serving dtype: float32 | bfloat16 | float16 (autocast)"),
}


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """Flags that edit the preset's (or config file's) DistillJob (shared with pareto.py)."""
    p.add_argument("--preset", default="fmnist-cpu", choices=sorted(PRESETS),
                   help="starting configuration (default: %(default)s, Fashion-MNIST on CPU)")
    p.add_argument("--config", metavar="YAML", help="a job file with the same fields as a preset (see "
                   "`--print-config`); flags on the command line override it")
    p.add_argument("--print-config", action="store_true", help="print the resulting job as YAML and exit")
    p.add_argument("--data", metavar="DIR", help="IDX directory (Fashion-MNIST layout) or image folder with train/ and val/")
    p.add_argument("--teacher-checkpoint", metavar="FILE",
                   help="local teacher weights (a state dict or a timm/PyTorch checkpoint); default: the "
                        "shipped or cached teacher, else train it once and cache it")
    for flag, (_, kind, help_) in JOB_FLAGS.items():
        p.add_argument(flag, type=kind, help=help_)
    p.add_argument("--workers", type=positive_int, default=1, help="Ray Train workers = DDP replicas (default: 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, AMP)")
    p.add_argument("--cpus-per-worker", type=finite_float, help="CPUs reserved per worker (default: fitted to the cluster)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, a cluster on this node, else local)")
    p.add_argument("--smoke-test", action="store_true", help="tiny model, data subset, a few steps")


def job_from_args(args) -> DistillJob:
    """The preset (or --config file), then the flags, then --smoke-test: one validated job."""
    job = get_preset(args.preset)
    if args.config:
        job = override(job, _flatten(_read_config(args.config)))
    changes = {field: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, (field, _, _) in JOB_FLAGS.items()}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.data:
        changes["data.root"] = os.path.abspath(os.path.expanduser(args.data))
    if args.teacher_checkpoint:
        changes["teacher_checkpoint"] = os.path.abspath(os.path.expanduser(args.teacher_checkpoint))
    job = override(job, changes)
    return smoke(job) if args.smoke_test else job


def _read_config(path: str) -> dict:
    try:
        with open(os.path.expanduser(path)) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of job fields, not {type(data).__name__}")
    return data


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; the schedule and timm kwargs stay leaves' parents."""
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in ("model.schedule",) and value:
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def job_yaml(job: DistillJob) -> str:
    return yaml.safe_dump(job.to_dict(), sort_keys=False)


def validate_job(job: DistillJob) -> None:
    """Everything a user can get wrong, checked before Ray starts: raises ValueError with one line."""
    from sit_core.data import check_data

    model = job.model.build()  # schedule vs model: raises ValueError naming the bad value
    check_data(job.data, num_classes=model.num_classes)
    img = job.model.kwargs.get("img_size", job.data.img_size)
    if job.data.img_size != img:
        raise ValueError(f"data img_size {job.data.img_size} differs from the model's {img}")
    if job.teacher_checkpoint:  # a missing or mismatched teacher file fails here, not after Ray starts
        from sit_core.teachers import load_state
        load_state(job, job.teacher_checkpoint)


def parse_or_exit(p: argparse.ArgumentParser, build, argv: Optional[list] = None):
    """Parse, build the run's plan with `build(args)`, and turn any user mistake into one line, exit 2."""
    from sit_core.data import DataError

    args = p.parse_args(argv)
    try:
        return args, build(args)
    except (ValueError, DataError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
