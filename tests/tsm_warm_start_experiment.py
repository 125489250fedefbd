"""Does starting the TSMs as a spatial pooling (sit_core.warm_start) help FRD distillation?

A small, self-contained A/B on Fashion-MNIST (28 px, patch 4 -> 49 tokens, a width-96 6-block ViT):
train a teacher with cross-entropy, then distil the same slimmed student twice per seed, identical
in everything (weights, RTSMs, data order, recipe) except the TSM start: random (the official
init) vs `warm_start_tsms` on one batch. Prints validation top-1 and the FRD loss along the way.

    PYTHONPATH=$PWD python tests/tsm_warm_start_experiment.py                 # ~15 min on one busy core
    PYTHONPATH=$PWD python tests/tsm_warm_start_experiment.py --smoke-test    # ~1 min, checks it runs
    PYTHONPATH=$PWD python tests/tsm_warm_start_experiment.py --schedule 2,4@0.6 --seeds 0 1 2

Limits: a tiny budget on a toy dataset; a difference smaller than the seed-to-seed spread means
nothing. The deciding comparison is the project's training harness on a real preset
(`compare_warm_start` below is the function to call from it, or copy its two arms).
Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import argparse
import functools
import time

import timm
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader

from sit_core import FRDDistiller, FRDLoss, apply_slimming, student_from_teacher
from sit_core.data import DataSpec, load_splits
from sit_core.warm_start import warm_start_tsms

VIT = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3)
TRAIN_IMAGES, VAL_IMAGES = 20000, 2000
BATCH = 64
TEACHER_STEPS, STUDENT_STEPS = 400, 200
EVAL_AT = (0.0, 0.1, 0.25, 0.5, 1.0)  # fractions of the student budget
WARM_START_IMAGES = 64


@functools.lru_cache(maxsize=1)
def splits():
    return load_splits(DataSpec(img_size=VIT["img_size"], in_chans=1, train_subset=TRAIN_IMAGES, val_subset=VAL_IMAGES))


def loaders(seed: int):
    splits_ = splits()
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(splits_.train, batch_size=BATCH, shuffle=True, drop_last=True, generator=g)
    val = DataLoader(splits_.val, batch_size=512)
    return train, val


def endless(loader):
    while True:
        yield from loader


@torch.no_grad()
def accuracy(model, val) -> float:
    model.eval()
    hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in val)
    model.train()
    return hits / len(val.dataset)


def train_teacher(steps: int, seed: int):
    torch.manual_seed(seed)
    teacher = timm.create_model("vit_tiny_patch16_224", **VIT)
    opt = torch.optim.AdamW(teacher.parameters(), lr=2e-3, weight_decay=0.05)
    sched = CosineLRScheduler(opt, t_initial=steps, lr_min=1e-5, warmup_t=min(50, steps // 10), warmup_lr_init=1e-5)
    train, val = loaders(seed)
    batches = endless(train)
    teacher.train()
    for step in range(steps):
        x, y = next(batches)
        loss = F.cross_entropy(teacher(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step_update(step + 1)
    return teacher, accuracy(teacher, val)


def distil(teacher, schedule: str, warm: bool, steps: int, seed: int, lr: float = 1e-3) -> list[dict]:
    """One FRD run; everything but the TSM start is seeded identically across the two arms."""
    torch.manual_seed(seed)
    student = apply_slimming(timm.create_model("vit_tiny_patch16_224", **VIT), schedule)
    student, _ = student_from_teacher(student, teacher)
    train, val = loaders(seed)
    batches = endless(train)
    fit = []
    if warm:
        images = next(iter(DataLoader(train.dataset, batch_size=WARM_START_IMAGES, shuffle=True,
                                      generator=torch.Generator().manual_seed(seed + 7))))[0]
        fit = warm_start_tsms(student, images)
    torch.manual_seed(seed + 1)  # same RTSMs in both arms
    net = FRDDistiller(student, teacher).train()
    opt = torch.optim.AdamW(net.param_groups(lr, 0.05, 5.0), lr=lr)
    sched = CosineLRScheduler(opt, t_initial=steps, lr_min=1e-5)
    loss_fn = FRDLoss()
    evals = {max(0, round(f * steps)) for f in EVAL_AT}
    records, recent = [], []
    for step in range(steps + 1):
        if step in evals:
            records.append(dict(arm="warm" if warm else "random", seed=seed, step=step, val_top1=accuracy(student, val),
                                train_loss=sum(recent) / len(recent) if recent else float("nan"),
                                fit=[round(r.error_after, 3) for r in fit]))
            recent = []
        if step == steps:
            break
        x, y = next(batches)
        total, _ = loss_fn(*net(x), y)
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step_update(step + 1)
        recent.append(total.item())
    return records


def compare_warm_start(teacher, schedule: str, steps: int, seeds):
    """Both arms for every seed, random arm first: yields the records `distil` returns as each run ends."""
    for seed in seeds:
        for warm in (False, True):
            yield from distil(teacher, schedule, warm, steps, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", default="1,2,3@0.5", help="TSM schedule (default: SiT-T/XS-style early slimming)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS)
    parser.add_argument("--steps", type=int, default=STUDENT_STEPS)
    parser.add_argument("--threads", type=int, default=1, help="1 is faster than 2 on a shared 2-core node")
    parser.add_argument("--smoke-test", action="store_true", help="tiny budget: only checks that it runs")
    args = parser.parse_args()
    if args.smoke_test:
        args.teacher_steps, args.steps, args.seeds = 20, 8, args.seeds[:1]
    torch.set_num_threads(args.threads)
    t0 = time.time()
    teacher, teacher_acc = train_teacher(args.teacher_steps, seed=100)
    print(f"protocol: Fashion-MNIST {TRAIN_IMAGES} train / {VAL_IMAGES} val, ViT {VIT}, batch {BATCH}, "
          f"teacher {args.teacher_steps} steps (val top-1 {teacher_acc:.4f}), students {args.steps} FRD steps, "
          f"lr 1e-3 (RTSM x5) cosine to 1e-5, schedule {args.schedule}, seeds {args.seeds}, "
          f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads", flush=True)
    print(f"{'seed':>4} {'arm':>6} {'step':>5} {'val_top1':>9} {'train_loss':>10}  warm-start fit (TV error per TSM)")
    for r in compare_warm_start(teacher, args.schedule, args.steps, args.seeds):
        print(f"{r['seed']:>4} {r['arm']:>6} {r['step']:>5} {r['val_top1']:>9.4f} {r['train_loss']:>10.4f}  {r['fit']}",
              flush=True)
    print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
