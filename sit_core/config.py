"""The one config object that flows spec -> model -> training -> trial -> Pareto -> card -> model.

Plain dataclasses that round-trip through JSON/YAML (`to_dict` / `from_dict`), so a Ray trial, an
MLflow run and a card on disk all carry the same thing. `override(job, {"train.lr": 1e-3, ...})` is
the one way to change a job: command-line flags, smoke runs, config files and search points all go
through it, and the result is validated like a fresh job. Nothing here imports Ray or MLflow.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional

import timm
import torch
from torch import nn

from .data import DataSpec
from .files import file_sha256
from .patch import WORKING_FAMILIES, apply_slimming, model_geometry, refusal
from .schedule import SlimSchedule, as_schedule


FINETUNE_MODES = ("none", "head", "all")  # DistillJob.teacher_finetune


def _finite(obj, *names: str, positive: bool = False, non_negative: bool = False) -> None:
    """One-line ValueError for a NaN/inf (or out-of-range) number: argparse happily parses 'nan'."""
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a finite number")
        if positive and not value > 0:
            raise ValueError(f"{name}={value} must be > 0")
        if non_negative and value < 0:
            raise ValueError(f"{name}={value} must be >= 0")


@dataclass
class ModelSpec:
    """A student architecture: timm backbone + its keyword overrides + the slimming schedule."""

    backbone: str = "vit_tiny_patch16_224"                 # timm name of the plain (teacher) architecture
    kwargs: dict = field(default_factory=dict)             # timm.create_model overrides (img_size, num_classes...)
    schedule: SlimSchedule = field(default_factory=lambda: SlimSchedule(reducer="none"))

    def __post_init__(self):
        self.schedule = as_schedule(self.schedule)

    def build_teacher(self, **extra) -> nn.Module:
        """The plain backbone (also the teacher's architecture). A name timm does not know, or options
        the model does not take, raise ValueError with one line (a user's `--model` lands here)."""
        import sit_core  # noqa: F401  (registers lvvit_* / sit_* with timm)
        kwargs = {**self.kwargs, **extra}
        if not timm.is_model(self.backbone):
            raise ValueError(f"unknown timm model {self.backbone!r}: timm.list_models('*vit*') lists the ViTs "
                             f"(slimming works on {WORKING_FAMILIES})")
        try:
            return timm.create_model(self.backbone, **kwargs)
        except TypeError as e:  # a keyword the model's class does not take (img_size on a ResNet...)
            raise ValueError(_kwargs_refusal(self.backbone, kwargs, e)) from None

    def build(self, **extra) -> nn.Module:
        """The inference student: backbone + reducers, random reducer weights."""
        return apply_slimming(self.build_teacher(**extra), self.schedule)

    def geometry(self) -> "Geometry":
        """Depth, patch tokens, prefix tokens and width of the backbone (a meta-device build: no weights).
        A backbone slimming cannot serve raises ValueError with the one line saying why."""
        return Geometry(*model_geometry(self._meta_teacher()))

    def input_size(self) -> tuple[int, int]:
        """(in_chans, img_size) the backbone takes: what the data must be resized to."""
        embed = self._meta_teacher().patch_embed
        first_conv = next((m for m in embed.modules() if isinstance(m, nn.Conv2d)), None)  # LV-ViT: a conv stem
        in_chans = first_conv.in_channels if first_conv is not None else self.kwargs.get("in_chans", 3)
        return int(in_chans), int(embed.img_size[0])

    def pretrained_cfg(self) -> dict:
        """timm's pretrained config of the backbone (mean/std, classifier name, its weights' class count)."""
        return dict(getattr(self._meta_teacher(), "pretrained_cfg", None) or {})

    def refusal(self, schedule) -> Optional[str]:
        """Why `schedule` cannot run on this backbone (one line, sit_core.patch's reasons), or None."""
        return refusal(self._meta_teacher(), as_schedule(schedule))

    def _meta_teacher(self) -> nn.Module:
        return _meta_teacher(self.backbone, json.dumps(self.kwargs, sort_keys=True, default=str))

    def with_schedule(self, schedule) -> "ModelSpec":
        return dataclasses.replace(self, schedule=as_schedule(schedule))

    def teacher(self) -> "ModelSpec":
        return self.with_schedule(None)

    def architecture_key(self) -> str:
        """Stable hash of what determines speed: backbone, overrides, schedule."""
        return stable_hash(self.to_dict())

    def to_dict(self) -> dict:
        return {"backbone": self.backbone, "kwargs": dict(self.kwargs), "schedule": self.schedule.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelSpec":
        _known(cls, d, "model")
        return cls(backbone=d["backbone"], kwargs=dict(d.get("kwargs") or {}), schedule=as_schedule(d.get("schedule")))


class Geometry(NamedTuple):
    depth: int
    num_patches: int
    num_prefix_tokens: int
    embed_dim: int


@functools.lru_cache(maxsize=16)
def _meta_teacher(backbone: str, kwargs_json: str) -> nn.Module:
    """The plain backbone on the meta device (shapes only: a real DeiT-S build takes seconds on 2
    cores), refused in one line if token slimming cannot serve its family."""
    with torch.device("meta"):
        model = ModelSpec(backbone, json.loads(kwargs_json)).build_teacher(pretrained=False)
    if getattr(model, "slim_schedule", None) is not None:
        raise ValueError(f"{backbone} is already a slimmed model ({model.slim_schedule}): give its plain "
                         "backbone (e.g. deit_small_patch16_224 for sit_deit_small) and a schedule")
    why = refusal(model, SlimSchedule(reducer="none"))  # what the model IS (EVA, BEiT, not a ViT...)
    if why:
        raise ValueError(why)
    return model


def _kwargs_refusal(backbone: str, kwargs: dict, error: Exception) -> str:
    """Why timm could not build `backbone` with `kwargs`: the family refusal if the model could never
    be slimmed anyway (a ResNet given img_size), else the options it does not take."""
    try:
        with torch.device("meta"):
            bare = timm.create_model(backbone, pretrained=False)
        why = refusal(bare, SlimSchedule(reducer="none"))
    except Exception:  # noqa: BLE001  (the bare build is only a better message; the original error stands)
        why = None
    return why or f"timm model {backbone} does not take the options {sorted(kwargs)}: {str(error).splitlines()[0]}"


@dataclass
class LossWeights:
    """FRD weights (the reference defaults)."""

    lambda_token: float = 2.0
    lambda_logits: float = 2.0
    tau: float = 1.0

    def __post_init__(self):
        _finite(self, "lambda_token", "lambda_logits", non_negative=True)
        _finite(self, "tau", positive=True)


@dataclass
class TrainSpec:
    """Optimisation recipe of one run (teacher training or distillation)."""

    epochs: int = 1
    batch_size: int = 128                    # global; split evenly over the workers
    lr: float = 5e-4                         # backbone + TSM learning rate at this batch size
    min_lr: float = 1e-5                     # cosine floor of every parameter group (official SiT)
    weight_decay: float = 0.05
    rtsm_lr_mult: float = 5.0                # RTSMs start 5x faster than the backbone
    warmup_steps: int = 0                    # the SiT recipe: no warm-up
    cooldown_epochs: int = 0                 # extra epochs at min_lr after the cosine (official: 10)
    label_smoothing: float = 0.0             # on the hard labels (mixup/cutmix smooth their own targets)
    mixup: float = 0.0                       # timm Mixup alpha (official ImageNet recipe: 0.8)
    cutmix: float = 0.0                      # timm CutMix alpha (official: 1.0)
    drop_path_rate: float = 0.0              # stochastic depth of the trained model
    grad_clip: Optional[float] = None
    max_steps_per_epoch: Optional[int] = None  # cap for smoke runs and short sweep trials
    device_batch_cap: Optional[int] = None   # most images per forward on one device; accumulate the rest
    tsm_init: str = "pool"                   # pool: TSMs start as a spatial pooling (README: +2.6 / +6.7 points
                                             # of the teacher at 1.7x / 3.5x) | random: the paper's start
    amp: bool = True                         # CUDA only: bf16 autocast (fp16 + GradScaler if no bf16)
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if not 0 <= self.cooldown_epochs < self.epochs:
            raise ValueError(f"cooldown_epochs={self.cooldown_epochs} must be in 0..epochs-1 (epochs={self.epochs})")
        _finite(self, "lr", "rtsm_lr_mult", positive=True)
        _finite(self, "min_lr", "weight_decay", "mixup", "cutmix", "label_smoothing", "drop_path_rate",
                "warmup_steps", non_negative=True)
        _finite(self, "grad_clip", positive=True)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must not exceed lr={self.lr}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.drop_path_rate < 1:
            raise ValueError("label_smoothing and drop_path_rate must be in [0, 1)")
        if self.tsm_init not in ("random", "pool"):
            raise ValueError(f"tsm_init={self.tsm_init!r} must be random or pool")
        for name in ("max_steps_per_epoch", "device_batch_cap"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1 (or unset)")

    @property
    def cosine_epochs(self) -> int:
        return self.epochs - self.cooldown_epochs


@dataclass
class SpeedSpec:
    """Where and how latency is modelled and measured: the serving setting."""

    batch_size: int = 64                     # 1 for online serving, 64 for throughput
    warmup: int = 3
    iters: int = 10
    threads: Optional[int] = None            # CPU threads; None = all the node's cores
    dtype: str = "float32"                   # float32 | bfloat16 | float16 (autocast)
    device: str = "cpu"                      # cpu | cuda

    def __post_init__(self):
        for name in ("batch_size", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"speed {name}={getattr(self, name)} must be >= 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"speed dtype {self.dtype!r} must be float32, bfloat16 or float16")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"speed device {self.device!r} must be cpu or cuda")


@dataclass
class DistillJob:
    """Everything needed to distil and measure one candidate."""

    name: str = "candidate"
    model: ModelSpec = field(default_factory=ModelSpec)
    loss: LossWeights = field(default_factory=LossWeights)
    train: TrainSpec = field(default_factory=TrainSpec)
    data: DataSpec = field(default_factory=DataSpec)
    teacher_checkpoint: Optional[str] = None   # local weights file or teacher card; None -> see below
    teacher_pretrained: Optional[str] = None   # "timm": timm's weights for model.backbone's tag (downloaded),
                                               # or a local copy of them loaded through timm (pos-embed resized)
    # none: the teacher is the checkpoint/pretrained weights as they are (or, with neither, the shipped,
    # cached or trained-from-scratch teacher); head / all: fine-tune its head (or everything) on the
    # data first with `teacher_train`, cached by `teacher_key()`
    teacher_finetune: str = "none"
    teacher_train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=3, lr=1e-3))
    speed: SpeedSpec = field(default_factory=SpeedSpec)

    def __post_init__(self):
        if self.teacher_finetune not in FINETUNE_MODES:
            raise ValueError(f"teacher_finetune={self.teacher_finetune!r} must be one of {', '.join(FINETUNE_MODES)}")
        if self.teacher_checkpoint and self.teacher_pretrained:
            raise ValueError("give the teacher's weights once: teacher_checkpoint or teacher_pretrained, not both")
        if self.teacher_finetune != "none" and not (self.teacher_checkpoint or self.teacher_pretrained):
            raise ValueError("fine-tuning the teacher needs its weights: a checkpoint (--teacher-checkpoint, "
                             "--teacher-card) or timm's pretrained ones (--pretrained)")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "DistillJob":
        _known(cls, d, "job")
        sections = {"loss": LossWeights, "train": TrainSpec, "data": DataSpec, "teacher_train": TrainSpec,
                    "speed": SpeedSpec}
        built = {}
        for key, kind in sections.items():
            value = d.get(key) or {}
            _known(kind, value, key)
            built[key] = kind(**value)
        return cls(name=d.get("name", "candidate"), model=ModelSpec.from_dict(d["model"]),
                   teacher_checkpoint=d.get("teacher_checkpoint"), teacher_pretrained=d.get("teacher_pretrained"),
                   teacher_finetune=d.get("teacher_finetune", "none"), **built)

    def teacher_key(self) -> str:
        """Hash of what determines a project-trained teacher: architecture, data, recipe.

        Fields at their default value are left out, so a new option whose default keeps the old
        behaviour does not orphan every trained (and the shipped) teacher. Changing a default IS a
        recipe change: `tests/test_teachers.py` compares the shipped teacher's recorded recipe with
        the preset's, field by field, and fails if a default moved under it.
        """
        # Evaluation-only subsets and distillation-only options do not change the teacher's weights.
        data = _non_default(self.data, skip=("val_subset", "test_subset"))
        train = _non_default(self.teacher_train, skip=DISTILLATION_ONLY)
        key = {"arch": {"backbone": self.model.backbone, "kwargs": self.model.kwargs}, "data": data, "train": train}
        if self.teacher_finetune != "none" or self.teacher_pretrained:
            # the weights it starts from, by content: the same path holding new weights is another teacher
            key["start"] = {"finetune": self.teacher_finetune, "weights": self.teacher_source()}
        return stable_hash(key)

    def teacher_source(self) -> Optional[dict]:
        """Where the teacher's weights come from, by content (sha256 of the file; timm's tag)."""
        if self.teacher_checkpoint:
            return {"checkpoint": content_sha256(self.teacher_checkpoint)}
        if self.teacher_pretrained == "timm":
            return {"pretrained": self.model.backbone}
        if self.teacher_pretrained:
            return {"pretrained_file": content_sha256(self.teacher_pretrained)}
        return None


def override(job: DistillJob, changes: Mapping[str, Any]) -> DistillJob:
    """A validated copy of `job` with dotted fields replaced, e.g. {"train.lr": 1e-3, "model.schedule": "2,4@0.5"}.

    `model.kwargs.<name>` sets one timm keyword; a value of None for it removes the keyword.
    Unknown fields raise ValueError naming the valid ones.
    """
    d = job.to_dict()
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = d
        for i, key in enumerate(parents):
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"unknown job field {'.'.join(parents[:i + 1])!r} (in {path!r})")
            node = node[key]
        in_kwargs = parents == ["model", "kwargs"]
        if not isinstance(node, dict) or (leaf not in node and not in_kwargs):
            valid = sorted(node) if isinstance(node, dict) else []
            raise ValueError(f"unknown job field {path!r}: valid fields here are {', '.join(valid)}")
        if isinstance(value, SlimSchedule) or (path == "model.schedule" and isinstance(value, str)):
            value = as_schedule(value).to_dict()
        if in_kwargs and value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = copy.deepcopy(value)
    return DistillJob.from_dict(d)


def content_sha256(path: str) -> str:
    """sha256 of a weights file, remembered per (path, size, mtime): big checkpoints are hashed once."""
    try:
        st = os.stat(os.path.expanduser(path))
    except OSError as e:
        raise ValueError(f"teacher weights {path}: {e.strerror}") from None
    return _sha256_of(os.path.realpath(os.path.expanduser(path)), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def _known(kind, d: Mapping, where: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping of fields, got {type(d).__name__}")
    valid = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(f"unknown {where} field(s) {', '.join(unknown)}: valid are {', '.join(sorted(valid))}")


# TrainSpec fields a teacher's training never reads (it has no TSM or RTSM)
DISTILLATION_ONLY = ("rtsm_lr_mult", "tsm_init")


def _non_default(spec, skip: tuple = ()) -> dict:
    """The dataclass's fields that differ from their defaults (minus `skip`), as plain values."""
    def default(f):
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
            if f.name not in skip and getattr(spec, f.name) != default(f)}


def stable_hash(obj: Any, length: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
