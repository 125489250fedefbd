"""The one config object that flows spec -> model -> training -> trial -> Pareto -> card -> model.

Plain dataclasses that round-trip through JSON/YAML (`to_dict` / `from_dict`), so a Ray trial, an
MLflow run and a card on disk all carry the same thing. Nothing here imports Ray or MLflow.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import timm
from torch import nn

from .data import DataSpec
from .patch import apply_slimming
from .schedule import SlimSchedule, as_schedule


@dataclass
class ModelSpec:
    """A student architecture: timm backbone + its keyword overrides + the slimming schedule."""

    backbone: str = "vit_tiny_patch16_224"                 # timm name of the plain (teacher) architecture
    kwargs: dict = field(default_factory=dict)             # timm.create_model overrides (img_size, num_classes...)
    schedule: SlimSchedule = field(default_factory=lambda: SlimSchedule(reducer="none"))

    def __post_init__(self):
        self.schedule = as_schedule(self.schedule)

    def build_teacher(self, **extra) -> nn.Module:
        """The plain backbone (also the teacher's architecture)."""
        import sit_core  # noqa: F401  (registers lvvit_* / sit_* with timm)
        return timm.create_model(self.backbone, **{**self.kwargs, **extra})

    def build(self, **extra) -> nn.Module:
        """The inference student: backbone + reducers, random reducer weights."""
        return apply_slimming(self.build_teacher(**extra), self.schedule)

    def with_schedule(self, schedule) -> "ModelSpec":
        return dataclasses.replace(self, schedule=as_schedule(schedule))

    def architecture_key(self) -> str:
        """Stable hash of what determines speed: backbone, overrides, schedule."""
        return stable_hash(self.to_dict())

    def to_dict(self) -> dict:
        return {"backbone": self.backbone, "kwargs": dict(self.kwargs), "schedule": self.schedule.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(backbone=d["backbone"], kwargs=dict(d.get("kwargs", {})), schedule=as_schedule(d["schedule"]))


@dataclass
class LossWeights:
    """FRD weights (SPEC reference defaults)."""

    lambda_token: float = 2.0
    lambda_logits: float = 2.0
    tau: float = 1.0


@dataclass
class TrainSpec:
    """Optimisation recipe of one run (teacher training or distillation)."""

    epochs: int = 1
    batch_size: int = 128                    # global; split evenly over the workers
    lr: float = 5e-4                         # backbone + TSM learning rate at this batch size
    min_lr: float = 1e-5                     # cosine floor
    weight_decay: float = 0.05
    rtsm_lr_mult: float = 5.0                # SPEC: RTSMs learn 5x faster than the backbone
    warmup_steps: int = 0                    # SPEC recipe: no warm-up
    grad_clip: Optional[float] = None
    max_steps_per_epoch: Optional[int] = None  # cap for smoke runs
    amp: bool = True                         # CUDA only: bf16 autocast (fp16 + GradScaler if no bf16)
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")


@dataclass
class SpeedSpec:
    """How latency is measured in a trial (SPEC speed protocol)."""

    batch_size: int = 64
    warmup: int = 3
    iters: int = 10
    threads: Optional[int] = None            # CPU threads for the probe; None = all the node's cores
    dtype: str = "float32"


@dataclass
class DistillJob:
    """Everything needed to distill and measure one candidate."""

    name: str = "candidate"
    model: ModelSpec = field(default_factory=ModelSpec)
    loss: LossWeights = field(default_factory=LossWeights)
    train: TrainSpec = field(default_factory=TrainSpec)
    data: DataSpec = field(default_factory=DataSpec)
    teacher_checkpoint: Optional[str] = None   # local file; None -> train the teacher and cache it
    teacher_train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=3, lr=1e-3))
    speed: SpeedSpec = field(default_factory=SpeedSpec)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DistillJob":
        return cls(
            name=d.get("name", "candidate"),
            model=ModelSpec.from_dict(d["model"]),
            loss=LossWeights(**d.get("loss", {})),
            train=TrainSpec(**d.get("train", {})),
            data=DataSpec(**d.get("data", {})),
            teacher_checkpoint=d.get("teacher_checkpoint"),
            teacher_train=TrainSpec(**d.get("teacher_train", {})),
            speed=SpeedSpec(**d.get("speed", {})),
        )

    def teacher_key(self) -> str:
        """Hash of what determines a project-trained teacher: architecture, data, recipe."""
        arch = {"backbone": self.model.backbone, "kwargs": self.model.kwargs}
        data = dataclasses.asdict(self.data)
        return stable_hash({"arch": arch, "data": data, "train": dataclasses.asdict(self.teacher_train)})


def stable_hash(obj: Any, length: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
