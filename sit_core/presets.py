"""Named starting points: a small CPU preset on Fashion-MNIST, ImageNet presets for DeiT / LV-ViT.

A preset is a whole `DistillJob`; command-line flags, config files and search points change it
through `sit_core.config.override`.
"""
from __future__ import annotations

import copy
import dataclasses

from .config import DistillJob, LossWeights, ModelSpec, SpeedSpec, TrainSpec, override
from .data import DataSpec
from .schedule import PAPER_SCHEDULES, SIT_LVVIT_VARIANTS, SlimSchedule

# Fashion-MNIST on 2 CPU cores at its native 28 px: patch 4 gives 49 patch tokens (enough for
# slimming to matter) and a 6-block width-96 ViT trains to >= 90% test top-1 on 2 cores.
FMNIST_VIT = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3)

PRESETS: dict[str, DistillJob] = {
    "fmnist-cpu": DistillJob(
        name="fmnist-cpu",
        model=ModelSpec("vit_tiny_patch16_224", FMNIST_VIT, SlimSchedule((2, 4), 0.6)),
        loss=LossWeights(),
        # One sweep trial's full budget: 4 x 25 steps of 64 (6.4k images); the sweep's early
        # stopping decides after the first epochs whether a candidate gets the rest.
        train=TrainSpec(epochs=4, batch_size=64, lr=1e-3, min_lr=1e-5, weight_decay=0.05, max_steps_per_epoch=25),
        # Validation on 2,048 held-out training images (+-0.7% at 90%): cheap enough to run every epoch.
        data=DataSpec(kind="fashion_mnist", img_size=28, in_chans=1, val_subset=2048),
        # 40 epochs of the 54k training images (421 steps each), 2 of them warm-up: ViTs learn slowly
        # on small data (a 15-epoch run was at 80% after 5 epochs, its loss far above the smoothing floor).
        teacher_train=TrainSpec(epochs=40, batch_size=128, lr=2e-3, min_lr=1e-5, warmup_steps=842,
                                label_smoothing=0.1, drop_path_rate=0.05),
        # One probe thread: on a 2-core node, Ray's background work stalls a 2-thread OpenMP barrier.
        speed=SpeedSpec(batch_size=64, warmup=5, iters=30, threads=1),
    ),
}

# ImageNet: the official SiT recipe (AdamW wd 0.05, lr 2e-4 x batch/512, RTSM x5, cosine to 1e-5 for
# every group, no warm-up, 125 epochs + 10 of cool-down at min_lr, AMP, mixup 0.8 / cutmix 1.0 /
# label smoothing 0.1). Teachers come from local checkpoint files (--teacher-checkpoint).
_IMAGENET_TRAIN = TrainSpec(epochs=135, cooldown_epochs=10, batch_size=1024, lr=2e-4 * 1024 / 512, min_lr=1e-5,
                            weight_decay=0.05, rtsm_lr_mult=5.0, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
                            drop_path_rate=0.1, device_batch_cap=128, amp=True)
_IMAGENET_SPEED = SpeedSpec(batch_size=64, warmup=10, iters=50)
# Official drop-path per student (exp/*/train.sh): SiT-T 0.0, SiT-L 0.3, the others main.py's 0.1.
# DeiT: 0.1 (DeiT's recipe), 0.0 for the tiny model (its capacity is the limit, not overfitting).
_DROP_PATH = {"deit-tiny": 0.0, "lvvit-tiny": 0.0, "lvvit-large": 0.3}
# Most images per forward on one GPU (gradients accumulate to the global 1024, so `--workers 1` keeps
# the recipe): sized for a 24 GB A10G from an activation estimate (Korthikanti et al. 2022, mixed
# precision: depth x tokens x width x (34 + 5 x heads x tokens / width) bytes per image): <= 12 GiB
# at 128 for DeiT-T/S/B and LV-ViT-T..M; LV-ViT-L (288 px, 325 tokens, 24 blocks) needs ~340 MiB
# per image, so 32. An estimate, not a measurement: lower it (--device-batch-cap) on an OOM.
_DEVICE_BATCH_CAP = {"lvvit-large": 32}
# Validation on 10,000 held-out training images (+-0.4% at 80% top-1) every epoch, not the 128k that
# val_fraction holds out: the full set costs a tenth of an epoch's compute at every epoch.
_VAL_SUBSET = 10_000


def _imagenet(name: str, backbone: str, schedule: SlimSchedule, img_size: int = 224) -> DistillJob:
    job = DistillJob(name=name, model=ModelSpec(backbone, dict(num_classes=1000, img_size=img_size), schedule),
                     train=_IMAGENET_TRAIN,
                     data=DataSpec(kind="folder", root="/data/imagenet", img_size=img_size, in_chans=3,
                                   val_subset=_VAL_SUBSET),
                     speed=_IMAGENET_SPEED)
    short = name.removesuffix("-imagenet")
    return override(job, {"train.drop_path_rate": _DROP_PATH.get(short, 0.1),
                          "train.device_batch_cap": _DEVICE_BATCH_CAP.get(short, _IMAGENET_TRAIN.device_batch_cap)})


for _size in ("tiny", "small", "base"):
    PRESETS[f"deit-{_size}-imagenet"] = _imagenet(f"deit-{_size}-imagenet", f"deit_{_size}_patch16_224",
                                                   PAPER_SCHEDULES["deit_flop_matched"].schedule)


def _add_lvvit_presets() -> None:
    from .lvvit import LVVIT_VARIANTS

    for variant in SIT_LVVIT_VARIANTS:
        row = PAPER_SCHEDULES[f"sit_lvvit_{variant}"]
        img = LVVIT_VARIANTS[row.backbone.removeprefix("lvvit_")].img_size
        PRESETS[f"lvvit-{variant}-imagenet"] = _imagenet(f"lvvit-{variant}-imagenet", row.backbone, row.schedule, img)


_add_lvvit_presets()


def get_preset(name: str) -> DistillJob:
    """A fresh copy of a preset (callers may mutate it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def smoke(job: DistillJob) -> DistillJob:
    """The same job shrunk to run in well under a minute on 2 CPU cores."""
    changes = {"train.epochs": 2, "train.cooldown_epochs": 0, "train.max_steps_per_epoch": 4, "train.batch_size": 32,
               "teacher_train.epochs": 1, "teacher_train.cooldown_epochs": 0, "teacher_train.max_steps_per_epoch": 16,
               "teacher_train.batch_size": 64, "teacher_train.warmup_steps": 0,
               "speed.batch_size": 16, "speed.warmup": 2, "speed.iters": 5}
    if job.data.kind == "fashion_mnist":
        changes.update({"data.train_subset": 1024, "data.val_subset": 256, "data.test_subset": 256,
                        "model.kwargs.embed_dim": 48, "model.kwargs.depth": 4, "model.kwargs.num_heads": 2,
                        "model.schedule": "1,2@0.6"})
    return override(job, changes)


# Fine-tuning a trained teacher on the user's data (`--finetune-teacher`): a short cosine from a
# fine-tuning lr, no warm-up and none of the from-scratch regularisers. A new head learns fast (1e-3);
# the whole backbone takes a smaller step (1e-4, timm's fine-tuning scale at batch ~128).
FINETUNE_LR = {"head": 1e-3, "all": 1e-4}


def finetune(job: DistillJob, epochs: int, mode: str = "head") -> DistillJob:
    """The job with its teacher fine-tuned first (`mode`: head | all) for `epochs`. A job that was not
    fine-tuning gets the fine-tuning recipe (its teacher recipe trained from scratch); one that was
    (a job file) keeps its recipe, with the new epochs and mode."""
    changes = {"teacher_finetune": mode, "teacher_train.epochs": epochs}
    if job.teacher_finetune == "none":
        recipe = TrainSpec(epochs=epochs, batch_size=job.train.batch_size, lr=FINETUNE_LR[mode], min_lr=1e-6,
                           weight_decay=0.05, label_smoothing=0.1, device_batch_cap=job.train.device_batch_cap,
                           amp=job.train.amp, seed=job.train.seed)
        changes = {"teacher_finetune": mode, "teacher_train": dataclasses.asdict(recipe)}
    return override(job, changes)
