"""Training math, pure PyTorch: what is trained, its optimiser and schedule, an epoch, top-1.

The same code serves the Ray Train worker (`sweeps/train_loop.py`: DDP over many workers) and a
one-worker sweep trial that trains inside its own process. Distribution enters only through two
arguments: `model` (the net, or its DDP wrapper) and `reduce` (sums a tensor over the workers).

    task = distill_task(job, teacher_state, train_set)   # or teacher_task(job); train_set fits the TSM warm start
    trainer = Trainer(task, job.train, steps_per_epoch=100, device=device)
    for epoch in range(job.train.epochs):
        stats = trainer.train_epoch(loader)
        val = trainer.top1(val_set)
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.data.mixup import Mixup, mixup_target
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader

from .config import DistillJob, TrainSpec
from .distill import FRDDistiller, student_from_teacher
from .loss import FRDLoss
from .warm_start import warm_start_tsms

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the workers (identity alone)
EVAL_BATCH = 256
WARM_START_IMAGES = 256  # images the TSM warm start is fitted on


@dataclass
class Task:
    """What one run trains: the net the optimiser updates, the model it ships, and its loss."""

    net: nn.Module                      # teacher model, or FRDDistiller (student + RTSMs + frozen teacher)
    inference_model: nn.Module          # what is evaluated, measured and shipped
    loss: Callable                      # (outputs, targets) -> (total, parts)
    num_classes: int
    param_groups: Callable[[TrainSpec], list]

    def trainable_state(self) -> dict:
        """The net's state without the frozen teacher: what a checkpoint must hold to resume."""
        return {k: v for k, v in self.net.state_dict().items() if not k.startswith("teacher.")}


def teacher_task(job: DistillJob, start_state: Optional[dict] = None) -> Task:
    """Train the plain backbone with cross-entropy: from scratch, or fine-tune `start_state` (the
    weights `teachers.start_weights` fitted to the backbone). `teacher_finetune == "head"` trains only
    the classifier; the rest stays frozen (no gradients, no optimiser state)."""
    model = job.model.build_teacher(drop_path_rate=job.teacher_train.drop_path_rate)
    if start_state is not None:
        model.load_state_dict(start_state)
    if job.teacher_finetune == "head":
        heads = model.get_classifier()  # distilled DeiT: (head, head_dist)
        head = {id(p) for h in (heads if isinstance(heads, tuple) else (heads,)) for p in h.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)

    def loss(logits, targets):
        total = F.cross_entropy(logits, targets)  # targets: class indices or probabilities
        return total, {"loss": total.detach(), "loss_cls": total.detach()}

    return Task(model, model, loss, model.num_classes,
                lambda r: param_groups_weight_decay(model, r.weight_decay, no_weight_decay_list=model.no_weight_decay()))


def distill_task(job: DistillJob, teacher_state: dict, train_set=None) -> Task:
    """Distil the slimmed student from the frozen teacher with FRD (student initialised from the teacher).

    With `train.tsm_init == "pool"` the TSMs are fitted to start as a spatial pooling on a fixed,
    seeded batch of `train_set` (the same batch on every DDP rank, so every replica starts equal)."""
    teacher = job.model.build_teacher()
    teacher.load_state_dict(teacher_state)
    student, _ = student_from_teacher(job.model.build(drop_path_rate=job.train.drop_path_rate), teacher)
    if job.train.tsm_init == "pool":
        if train_set is None:
            raise ValueError("tsm_init='pool' needs the training set to fit the TSMs on")
        warm_start_tsms(student, fixed_batch(train_set, WARM_START_IMAGES, seed=job.train.seed))
    net = FRDDistiller(student, teacher)
    criterion = FRDLoss(job.loss.lambda_token, job.loss.lambda_logits, job.loss.tau)
    return Task(net, net.student, lambda out, targets: criterion(*out, targets), student.num_classes,
                lambda r: net.param_groups(r.lr, r.weight_decay, r.rtsm_lr_mult))


@dataclass
class EpochStats:
    status: str                         # ok | non_finite
    train_loss: float
    parts: dict                         # mean of each loss component over the epoch
    train_img_s: float                  # images per second over all workers
    train_s: float
    lr: float                           # the first group's lr at the end of the epoch
    failure: Optional[str] = None

    def metrics(self) -> dict:
        out = {"status": self.status, "train_loss": self.train_loss, "train_img_s": self.train_img_s,
               "train_s": self.train_s, "lr": self.lr, **{f"train_{k}": v for k, v in self.parts.items()}}
        if self.failure:
            out["failure"] = self.failure
        return out


class Trainer:
    """AdamW + timm's cosine schedule (per step, every group down to `min_lr`), AMP on CUDA,
    gradient accumulation under a per-device batch cap, a non-finite guard all workers agree on."""

    def __init__(self, task: Task, recipe: TrainSpec, *, steps_per_epoch: int, device: torch.device,
                 model: Optional[nn.Module] = None, reduce: Optional[Reduce] = None, world: int = 1):
        self.task, self.recipe, self.device = task, recipe, torch.device(device)
        self.model = model if model is not None else task.net.to(self.device)
        self.reduce, self.world = reduce or (lambda t: t), world
        self.steps_per_epoch = steps_per_epoch
        self.optimizer = torch.optim.AdamW(task.param_groups(recipe), lr=recipe.lr)
        cosine_steps = max(1, steps_per_epoch * recipe.cosine_epochs - recipe.warmup_steps)
        # lr_min is shared by every group, so the RTSM group (5x lr) also ends at min_lr (official SiT).
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=cosine_steps, lr_min=recipe.min_lr,
                                           warmup_t=recipe.warmup_steps, warmup_lr_init=recipe.min_lr,
                                           warmup_prefix=True, t_in_epochs=False)
        self.step_count = 0
        self.amp_dtype = _amp_dtype(self.device, recipe.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.mixup = (Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.label_smoothing,
                            num_classes=task.num_classes) if recipe.mixup > 0 or recipe.cutmix > 0 else None)

    def _autocast(self):
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def _targets(self, x, y):
        """Mixup/CutMix, or label smoothing, turn labels into probabilities (timm's soft-target path)."""
        if self.mixup is not None and len(x) % 2 == 0:
            return self.mixup(x, y)
        if self.recipe.label_smoothing > 0:
            return x, mixup_target(y, self.task.num_classes, smoothing=self.recipe.label_smoothing)
        return x, y

    def train_epoch(self, loader, guard: Callable = nullcontext, log: Optional[Callable[[str], None]] = None) -> EpochStats:
        """Up to `steps_per_epoch` optimiser steps over `loader`; `guard()` wraps each step."""
        self.model.train()
        sums: dict[str, float] = {}
        seen, t0 = 0, time.perf_counter()
        for step, (x, y) in enumerate(loader, start=1):
            if step > self.steps_per_epoch:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with guard():
                x, targets = self._targets(x, y)
                total, parts = self._accumulate(x, targets)
                # Every worker sees the same mean loss, so all stop at the same step (no DDP hang).
                mean_loss = self.reduce(total.detach().float().clone()) / self.world
                if not torch.isfinite(mean_loss):
                    return self._stats(sums, seen, t0, "non_finite",
                                       f"non-finite loss ({mean_loss.item()}) at step {step}: lower the lr or the loss weights")
                if self.recipe.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.step_count += 1
                self.scheduler.step_update(self.step_count)
            seen += len(x)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(x)
            if log is not None and step % max(1, self.steps_per_epoch // 4) == 0:
                log(f"  step {step}/{self.steps_per_epoch} loss {float(parts['loss']):.4f}")
        return self._stats(sums, seen, t0, "ok")

    def _accumulate(self, x, targets):
        """Forward/backward in micro-batches of at most `device_batch_cap`; gradients sum to the full batch's."""
        self.optimizer.zero_grad(set_to_none=True)
        cap = self.recipe.device_batch_cap or len(x)
        chunks = list(zip(x.split(cap), targets.split(cap)))
        total, parts = 0.0, {}
        for i, (xc, tc) in enumerate(chunks):
            last = i == len(chunks) - 1
            # DDP all-reduces gradients on every backward: only on the last micro-batch.
            sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss, p = self.task.loss(self.model(xc), tc)
                weight = len(xc) / len(x)
                self.scaler.scale(loss * weight).backward()
            total = total + loss.detach() * weight
            parts = {k: parts.get(k, 0.0) + v * weight for k, v in p.items()}
        return total, parts

    def _stats(self, sums, seen, t0, status, failure=None) -> EpochStats:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        parts = {k: v / max(seen, 1) for k, v in sums.items()}
        return EpochStats(status, parts.get("loss", math.nan), parts, seen * self.world / max(elapsed, 1e-9), elapsed,
                          self.optimizer.param_groups[0]["lr"], failure)

    @torch.no_grad()
    def top1(self, data, model: Optional[nn.Module] = None) -> float:
        """Top-1 (%) of the inference model on `data` (this worker's shard: a dataset or a loader),
        summed over the workers."""
        model = model or self.task.inference_model
        model.eval()
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        for x, y in data if isinstance(data, DataLoader) else DataLoader(data, batch_size=EVAL_BATCH):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                counts[0] += (model(x).argmax(-1) == y).sum()
            counts[1] += y.numel()
        counts = self.reduce(counts)
        return float(100.0 * counts[0] / counts[1].clamp_min(1))

    def state_dict(self) -> dict:
        """Everything needed to resume: trainable weights (no frozen teacher), optimiser, step, scaler."""
        return {"model": self.task.trainable_state(), "optimizer": self.optimizer.state_dict(),
                "step": self.step_count, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        missing, unexpected = self.task.net.load_state_dict(state["model"], strict=False)
        if unexpected or any(not k.startswith("teacher.") for k in missing):
            raise ValueError(f"checkpoint does not fit this run: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step_count = int(state["step"])
        self.scheduler.step_update(self.step_count)


def run_epochs(trainer: Trainer, loader, val, test, *, start_epoch: int, report: Callable[[dict, bool], None],
               guard: Callable = nullcontext, log: Optional[Callable[[str], None]] = None) -> None:
    """Epochs `start_epoch`..end: train, score top-1 on `val` (and `test` after the last), then
    `report(metrics, last)`. Stops early on a non-finite loss (its metrics say so)."""
    for epoch in range(start_epoch, trainer.recipe.epochs):
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)  # DistributedSampler: a new shuffle every epoch
        stats = trainer.train_epoch(loader, guard, log)
        last = epoch + 1 == trainer.recipe.epochs or stats.status != "ok"
        t_eval = time.perf_counter()
        with guard():
            metrics = {"epoch": epoch + 1, **stats.metrics(), "val_top1": trainer.top1(val)}
            if last:
                metrics["test_top1"] = trainer.top1(test)
        metrics["eval_s"] = time.perf_counter() - t_eval
        if log is not None:
            log(f"epoch {epoch + 1}/{trainer.recipe.epochs}: loss {stats.train_loss:.4f} "
                f"val top-1 {metrics['val_top1']:.2f}% ({stats.train_img_s:.0f} img/s)")
        report(metrics, last)
        if stats.status != "ok":
            return


def _amp_dtype(device: torch.device, amp: bool):
    if not amp or device.type != "cuda":
        return None  # fp32 on CPU: CPU autocast buys little for these models and changes numerics
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def fixed_batch(dataset, n: int, seed: int) -> torch.Tensor:
    """The images of n items of a seeded permutation of `dataset`, stacked (the same on every call)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([dataset[int(i)][0] for i in order])


def local_trainer(job: DistillJob, teacher_state: dict, *, threads: Optional[int] = None,
                  device: str = "cpu") -> tuple[Trainer, DataLoader, "Splits"]:
    """Everything one process needs to distil `job` alone (no workers): seeded like a Ray worker,
    the job's data loaded, the task built from the teacher's weights, a Trainer ready at step 0."""
    from .data import load_splits, train_loader

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(job.train.seed)
    splits = load_splits(job.data)
    loader = train_loader(splits.train, job.train.batch_size, cpus=threads or 1, pin_memory=device == "cuda")
    task = distill_task(job, teacher_state, splits.train)
    trainer = Trainer(task, job.train, steps_per_epoch=steps_per_epoch(job.train, len(loader)), device=device)
    return trainer, loader, splits


def device_batches(recipe: TrainSpec, world: int) -> tuple[int, int]:
    """(images per worker per optimiser step, most images per forward on one device).

    The global batch is split exactly over the `world` workers, and each worker's share is cut into
    forwards of at most `device_batch_cap` whose gradients `Trainer` sums: the recipe's global batch
    holds for any number of workers, and `--workers 1` never puts 1024 images on one GPU at once."""
    if recipe.batch_size % world:
        raise ValueError(f"batch_size {recipe.batch_size} does not split evenly over {world} workers: "
                         f"choose a worker count that divides it (or --batch-size)")
    per_worker = recipe.batch_size // world
    return per_worker, min(per_worker, recipe.device_batch_cap or per_worker)


def steps_per_epoch(recipe: TrainSpec, batches: int) -> int:
    """Optimiser steps per epoch: the loader's batches, capped by the recipe."""
    return max(1, min(batches, recipe.max_steps_per_epoch or batches))
