"""What every command-line script shares: a parser whose --help is the script's docstring, the flags
that edit a `DistillJob` (all applied through `sit_core.config.override`), and the up-front checks
that turn a user's mistake into one line and exit status 2 before Ray starts."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from typing import Optional

import yaml

from sit_core import teachers
from sit_core.config import DistillJob, ModelSpec, override
from sit_core.data import DataSpec
from sit_core.presets import PRESETS, finetune, get_preset, smoke
from sit_core.schedule import PAPER_SCHEDULES
from sit_core.teachers import card_teacher


# The Optuna samplers a sweep or a replay can use (built by sweeps.optuna_search.make_sampler; named
# here so that --help and bad input are answered before Ray and Optuna are imported).
SAMPLERS = ("tpe", "nsga2", "random", "gp")


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
                   help="starting configuration: recipes and budget (default: %(default)s, Fashion-MNIST on CPU)")
    p.add_argument("--config", metavar="YAML", help="a job file with the same fields as a preset (see "
                   "`--print-config`); flags on the command line override it")
    p.add_argument("--print-config", action="store_true", help="print the resulting job as YAML and exit")
    p.add_argument("--model", metavar="NAME", help="any timm ViT (deit3_small_patch16_224, vit_base_patch16_224."
                   "augreg_in21k_ft_in1k, vit_small_patch14_reg4_dinov2...): replaces the preset's backbone with timm's "
                   "defaults for it; data size and normalisation follow it, the schedule becomes the paper's DeiT "
                   "schedule scaled to its depth")
    p.add_argument("--num-classes", type=positive_int, metavar="N", help="classes of the model's head (must match the data's)")
    p.add_argument("--img-size", type=positive_int, metavar="PX", help="input side in pixels, for the model and the data")
    p.add_argument("--data", metavar="DIR", help="image folder with train/<class>/*.jpg and val/<class>/*.jpg, "
                   "or an IDX directory (Fashion-MNIST layout)")
    teacher = p.add_mutually_exclusive_group()
    teacher.add_argument("--teacher-checkpoint", metavar="FILE",
                         help="local teacher weights (a state dict or a timm/PyTorch checkpoint); default: the "
                              "shipped or cached teacher, else train it once and cache it")
    teacher.add_argument("--pretrained", nargs="?", const="timm", metavar="FILE",
                         help="the teacher is timm's pretrained weights for --model's tag, loaded through timm "
                              "(downloaded; or FILE, a local copy of them: its position embedding is resized)")
    teacher.add_argument("--teacher-card", metavar="CARD", help="a teacher card (sit_core.write_card of a plain "
                         "backbone): its model, input normalisation and weights")
    p.add_argument("--finetune-teacher", type=positive_int, metavar="EPOCHS",
                   help="first fine-tune the teacher on --data for EPOCHS epochs: its head, new if the weights were "
                        "trained for other classes (cached by config hash like a trained teacher)")
    p.add_argument("--finetune-backbone", action="store_true", help="with --finetune-teacher: train all of the "
                   "teacher, not only its head")
    for flag, (_, kind, help_) in JOB_FLAGS.items():
        p.add_argument(flag, type=kind, help=help_)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any job field as --print-config names it (VALUE is YAML), e.g. "
                        "--set model.kwargs.drop_path_rate=0.1 --set teacher_train.lr=3e-4; repeatable, applied last")
    p.add_argument("--workers", type=positive_int, default=1, help="Ray Train workers = DDP replicas (default: 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, AMP)")
    p.add_argument("--cpus-per-worker", type=finite_float, help="CPUs reserved per worker (default: fitted to the cluster)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, a cluster on this node, else local)")
    p.add_argument("--smoke-test", action="store_true", help="tiny model, data subset, a few steps")


def job_from_args(args) -> DistillJob:
    """The preset, the --config file, the flags, --set, what follows from the model, then --smoke-test
    (and --set again: it is the last word): one validated job, every step through `override`."""
    preset = get_preset(args.preset)
    given = _flatten(_read_config(args.config)) if args.config else {}
    job = override(preset, given)
    job = override(job, _flag_changes(args, job))
    if args.finetune_backbone and not args.finetune_teacher:
        raise ValueError("--finetune-backbone goes with --finetune-teacher EPOCHS")
    if args.finetune_teacher:
        job = finetune(job, args.finetune_teacher, "all" if args.finetune_backbone else "head")
    sets = _parse_sets(args.set)
    model = override(job, {k: v for k, v in sets.items() if k.startswith("model.")}).model
    # a backbone from a flag re-derives what follows from it; one from the job file keeps what the file says
    by_flag = bool(args.model or args.teacher_card)
    new_backbone = by_flag or model.backbone != preset.model.backbone
    follow = _follow_model(job, model, new_backbone=new_backbone, card=args.teacher_card,
                           fixed=set(sets) | (set() if by_flag else set(given)))
    job = override(job, {**follow, **sets})
    return override(smoke(job), sets) if args.smoke_test else job  # --set stays last, as --help says


def _flag_changes(args, job: DistillJob) -> dict:
    """The flags as dotted job fields, in order: architecture, data, teacher, then the JOB_FLAGS."""
    changes: dict = {}
    if args.teacher_card:  # the card's plain backbone and its weights
        card = card_teacher(args.teacher_card)
        changes.update({"model.backbone": card.model.backbone, "model.kwargs": dict(card.model.kwargs),
                        "teacher_checkpoint": args.teacher_card, "teacher_pretrained": None})
    if args.model and args.model != changes.get("model.backbone", job.model.backbone):
        # timm's defaults for the new backbone: the preset's keywords belong to its own backbone
        changes.update({"model.backbone": args.model, "model.kwargs": {},
                        "name": re.sub(r"[^A-Za-z0-9._-]", "_", args.model)})
    if args.num_classes:
        changes["model.kwargs.num_classes"] = args.num_classes
    if args.img_size:
        changes["model.kwargs.img_size"] = args.img_size
    if args.data:
        root = os.path.abspath(os.path.expanduser(args.data))
        kind = _data_kind(root, job.data.kind)
        # another kind of data: its own defaults (a preset's subsets are sized for its data set)
        fresh = dataclasses.asdict(DataSpec(kind=kind, root=root, seed=job.data.seed))
        changes.update({"data": fresh} if kind != job.data.kind else {"data.root": root})
    if args.teacher_checkpoint:
        changes.update({"teacher_checkpoint": args.teacher_checkpoint, "teacher_pretrained": None})
    if args.pretrained:
        changes.update({"teacher_pretrained": args.pretrained, "teacher_checkpoint": None})
    for flag, (field, _, _) in JOB_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            changes[field] = value
    return changes


def _data_kind(root: str, default: str) -> str:
    """folder if root holds train/, fashion_mnist if it holds IDX files, else the job's (its loader says what is missing)."""
    from sit_core.data import FASHION_MNIST_FILES
    if os.path.isdir(os.path.join(root, "train")):
        return "folder"
    if any(os.path.exists(os.path.join(root, f)) or os.path.exists(os.path.join(root, f + ".gz"))
           for f in FASHION_MNIST_FILES):
        return "fashion_mnist"
    return default


def _follow_model(job: DistillJob, model: ModelSpec, *, new_backbone: bool, fixed: set,
                  card: Optional[str]) -> dict:
    """What follows from the model: the data's size and channels (always: they must match it), and for
    a new backbone its input normalisation (timm's pretrained config, or the card's) and the paper's
    DeiT schedule scaled to its depth, unless `fixed` (given explicitly) names them. Paths become
    absolute (Ray workers run in other directories)."""
    in_chans, img = model.input_size()  # a backbone slimming cannot serve is refused here, in one line
    changes = {"data.img_size": img, "data.in_chans": in_chans}
    if new_backbone:
        if card:
            data = card_teacher(card).data
            mean, std = data.mean, data.std
        else:
            cfg = model.pretrained_cfg()
            mean, std = cfg.get("mean"), cfg.get("std")
        if mean is not None and std is not None and len(mean) in (1, in_chans) and not {"data.mean", "data.std"} & fixed:
            changes.update({"data.mean": list(mean), "data.std": list(std)})
        if "model.schedule" not in fixed:
            changes["model.schedule"] = PAPER_SCHEDULES["deit_flop_matched"].scaled_to(model.geometry().depth)
    for path in ("data.root", "teacher_checkpoint", "teacher_pretrained"):
        value = _get(job, path)
        if value and value != "timm":
            changes[path] = os.path.abspath(os.path.expanduser(value))
    return changes


def _get(job: DistillJob, path: str):
    node = job.to_dict()
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _parse_sets(items: list) -> dict:
    """--set FIELD=VALUE ... as override changes (VALUE parsed as YAML: 0.1, true, [0.5, 0.5, 0.5], 2,4@0.5)."""
    changes = {}
    for item in items:
        field, eq, text = item.partition("=")
        if not eq or not field.strip():
            raise ValueError(f"--set {item!r} must look like FIELD=VALUE, e.g. teacher_train.lr=3e-4")
        try:
            changes[field.strip()] = yaml.load(text, Loader=_Loader) if text.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: VALUE is not valid YAML ({str(e).splitlines()[0]})") from None
    return changes


class _Loader(yaml.SafeLoader):
    """safe_load that also reads 5e-4 as a number (YAML 1.1 wants 5.0e-4; people and Python write 5e-4)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _read_config(path: str) -> dict:
    try:
        with open(os.path.expanduser(path)) as f:
            data = yaml.load(f, Loader=_Loader) or {}
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of job fields, not {type(data).__name__}")
    return data


# Replaced as a whole, not merged field by field: a schedule is one value, and timm keywords belong
# to one backbone (a job file's kwargs must not inherit the preset's).
_WHOLE = ("model.schedule", "model.kwargs")


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; the schedule and timm kwargs stay whole."""
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in _WHOLE and value:
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def job_yaml(job: DistillJob) -> str:
    return yaml.safe_dump(job.to_dict(), sort_keys=False)


def validate_job(job: DistillJob) -> None:
    """Everything a user can get wrong, checked before Ray starts: raises ValueError with one line."""
    from sit_core.data import check_data

    model = job.model.build()  # backbone and schedule vs model: raises ValueError naming the bad value
    check_data(job.data, num_classes=model.num_classes)
    in_chans, img = job.model.input_size()
    if (job.data.img_size, job.data.in_chans) != (img, in_chans):
        raise ValueError(f"data img_size {job.data.img_size} / in_chans {job.data.in_chans} differ from the "
                         f"model's {img} / {in_chans}")
    # a missing or mismatched teacher (another head without --finetune-teacher) fails here, not after Ray starts
    if job.teacher_finetune != "none":
        teachers.start_weights(job)
    elif job.teacher_checkpoint:
        teachers.load_state(job, job.teacher_checkpoint)
    elif job.teacher_pretrained:
        teachers.ready_weights(job)


def parse_or_exit(p: argparse.ArgumentParser, build, argv: Optional[list] = None):
    """Parse, build the run's plan with `build(args)`, and turn any user mistake into one line, exit 2."""
    from sit_core.data import DataError

    args = p.parse_args(argv)
    try:
        return args, build(args)
    except (ValueError, DataError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
