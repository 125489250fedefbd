"""Named starting points: a small CPU preset on Fashion-MNIST, ImageNet presets for DeiT / LV-ViT.

A preset is a whole `DistillJob`; command-line flags and search spaces override its fields.
"""
from __future__ import annotations

import copy
import dataclasses

from .config import DistillJob, LossWeights, ModelSpec, SpeedSpec, TrainSpec
from .data import DataSpec
from .registry import DEIT_SCHEDULE
from .schedule import SlimSchedule

# Fashion-MNIST on 2 CPU cores: 32 px with patch 4 gives 64 patch tokens (enough for slimming to
# matter), a 6-block width-96 ViT trains to a useful teacher in minutes.
FMNIST_VIT = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3)

PRESETS: dict[str, DistillJob] = {
    "fmnist-cpu": DistillJob(
        name="fmnist-cpu",
        model=ModelSpec("vit_tiny_patch16_224", FMNIST_VIT, SlimSchedule((2, 4), 0.6)),
        loss=LossWeights(),
        # A sweep trial's budget: 2 x 20 steps of 128 (5k images), so the default sweep of 6 trials
        # fits in 10 minutes on 2 cores; compare_reducers.py --max-steps 40 gives students more.
        train=TrainSpec(epochs=2, batch_size=128, lr=1e-3, min_lr=1e-5, weight_decay=0.05, max_steps_per_epoch=20),
        data=DataSpec(kind="fashion_mnist", img_size=32, in_chans=1, train_subset=8192, val_subset=2048),
        teacher_train=TrainSpec(epochs=4, batch_size=128, lr=2e-3, min_lr=1e-5, warmup_steps=100),
        # One probe thread: on a 2-core node, Ray's own background work (a neighbour trial's worker
        # start-up, logging) stalls a 2-thread OpenMP barrier and made p50s swing by 3x.
        speed=SpeedSpec(batch_size=64, warmup=5, iters=30, threads=1),
    ),
}

# ImageNet: SPEC reference recipe (AdamW wd 0.05, lr 2e-4 x batch/512, RTSM x5, cosine to 1e-5,
# no warm-up, 125 epochs, AMP). Teachers must come from local checkpoint files (--teacher-checkpoint).
_IMAGENET_TRAIN = TrainSpec(epochs=125, batch_size=1024, lr=2e-4 * 1024 / 512, min_lr=1e-5, weight_decay=0.05,
                            rtsm_lr_mult=5.0, amp=True)
_IMAGENET_DATA = DataSpec(kind="folder", root="/data/imagenet", img_size=224, in_chans=3)
_IMAGENET_SPEED = SpeedSpec(batch_size=64, warmup=10, iters=50)


def _imagenet(name: str, backbone: str, schedule: SlimSchedule, img_size: int = 224) -> DistillJob:
    return DistillJob(
        name=name,
        model=ModelSpec(backbone, dict(num_classes=1000, img_size=img_size), schedule),
        train=_IMAGENET_TRAIN,
        data=dataclasses.replace(_IMAGENET_DATA, img_size=img_size),
        speed=_IMAGENET_SPEED,
    )


for _size in ("tiny", "small", "base"):
    PRESETS[f"deit-{_size}-imagenet"] = _imagenet(f"deit-{_size}-imagenet", f"deit_{_size}_patch16_224", DEIT_SCHEDULE)


def _add_lvvit_presets() -> None:
    from .lvvit import LVVIT_VARIANTS, SIT_LVVIT_SCHEDULES

    for variant, row in SIT_LVVIT_SCHEDULES.items():
        img = LVVIT_VARIANTS[row.teacher].img_size
        PRESETS[f"lvvit-{variant}-imagenet"] = _imagenet(
            f"lvvit-{variant}-imagenet", f"lvvit_{row.teacher}", SlimSchedule(row.tsm_after, row.keep_ratio), img)


_add_lvvit_presets()


def get_preset(name: str) -> DistillJob:
    """A fresh copy of a preset (callers may mutate it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def smoke(job: DistillJob) -> DistillJob:
    """The same job shrunk to run in well under a minute on 2 CPU cores."""
    job = copy.deepcopy(job)
    if job.data.kind == "fashion_mnist":
        job.data = dataclasses.replace(job.data, train_subset=1024, val_subset=512, test_subset=512)
        job.model.kwargs = {**job.model.kwargs, "embed_dim": 48, "depth": 4, "num_heads": 2}
        job.model.schedule = SlimSchedule((1, 2), 0.6)
    job.train = dataclasses.replace(job.train, epochs=1, max_steps_per_epoch=8, batch_size=64)
    job.teacher_train = dataclasses.replace(job.teacher_train, epochs=1, max_steps_per_epoch=16, batch_size=64,
                                            warmup_steps=0)
    job.speed = dataclasses.replace(job.speed, batch_size=16, warmup=2, iters=5)
    return job
