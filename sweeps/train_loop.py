"""The Ray Train worker function: distil one candidate (or train its teacher) with DDP.

`train_func(config)` runs on every worker of a `TorchTrainer`; `config` carries one serialised
`DistillJob` plus the mode, so the same function serves `sweeps/distill.py` and every sweep trial.
Per epoch it reports metrics and a checkpoint through Ray Train, resumes from the latest
checkpoint when Ray restarts it, and stops cleanly on a non-finite loss.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader, Subset

from sit_core.config import DistillJob
from sit_core.data import load_splits
from sit_core.distill import FRDDistiller, student_from_teacher
from sit_core.loss import FRDLoss

from .node_lock import NodeLock

STATE_FILE = "state.pt"   # everything needed to resume: model (+RTSM), optimiser, schedule, epoch
MODEL_FILE = "model.pt"   # the inference model only (no RTSM, no teacher): what cards ship


def train_func(config: dict) -> None:
    job = DistillJob.from_dict(config["job"])
    mode = config.get("mode", "distill")
    recipe = job.teacher_train if mode == "teacher" else job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    _match_threads_to_reserved_cpus()
    torch.manual_seed(recipe.seed)  # same init on every rank; DDP also broadcasts rank 0's weights

    splits = load_splits(job.data)
    per_worker = max(1, recipe.batch_size // world)
    train_loader = DataLoader(splits.train, batch_size=per_worker, shuffle=True, drop_last=True,
                              pin_memory=device.type == "cuda")
    train_loader = ray.train.torch.prepare_data_loader(train_loader)
    val_shard = Subset(splits.val, range(rank, len(splits.val), world))  # exact: no sampler padding
    test_shard = Subset(splits.test, range(rank, len(splits.test), world))

    net = _build(job, mode, config.get("teacher"))
    model = ray.train.torch.prepare_model(net)
    optimizer = torch.optim.AdamW(_param_groups(net, recipe), lr=recipe.lr)
    steps_per_epoch = min(len(train_loader), recipe.max_steps_per_epoch or len(train_loader))
    total_steps = max(1, steps_per_epoch * recipe.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total_steps, recipe))
    amp_dtype = _amp_dtype(device, recipe.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    criterion = FRDLoss(job.loss.lambda_token, job.loss.lambda_logits, job.loss.tau)
    guard = ProbeGuard(NodeLock() if config.get("probe_lock", True) else None, ctx.get_local_rank(), world)

    start_epoch = _restore(ray.train.get_checkpoint(), net, optimizer, scheduler, scaler)
    if rank == 0:
        print(f"[{mode}] {job.name}: {recipe.epochs} epoch(s) x {steps_per_epoch} steps on {world} worker(s) "
              f"({device.type}), starting at epoch {start_epoch + 1}", flush=True)
    for epoch in range(start_epoch, recipe.epochs):
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        stats = _train_epoch(model, net, mode, train_loader, steps_per_epoch, optimizer, scheduler, scaler,
                             criterion, recipe, device, amp_dtype, guard, world)
        inference_model = net.student if mode == "distill" else net
        t_eval = time.perf_counter()
        last = epoch + 1 == recipe.epochs or stats["status"] != "ok"
        with guard():
            metrics = {"epoch": epoch + 1, "mode": mode, "resumed_from_epoch": start_epoch, **stats,
                       "val_top1": _top1(inference_model, val_shard, device, amp_dtype, world)}
            if last:
                metrics["test_top1"] = _top1(inference_model, test_shard, device, amp_dtype, world)
        if last:
            metrics.update(_replica_report(inference_model, ctx))
        metrics["eval_s"] = time.perf_counter() - t_eval
        if rank == 0:
            print(f"[{mode}] epoch {epoch + 1}/{recipe.epochs}: loss {stats['train_loss']:.4f} "
                  f"val top-1 {metrics['val_top1']:.2f}% ({stats['train_img_s']:.0f} img/s)", flush=True)
        _report(metrics, net, inference_model, optimizer, scheduler, scaler, epoch + 1, rank)
        if stats["status"] != "ok":
            return


class ProbeGuard:
    """Keeps a node's speed probes and this run's compute apart, without deadlocking DDP.

    Only each node's local rank 0 takes the node lock (shared); a barrier then holds every rank
    until all of them hold what they need, so no rank ever waits on a lock while a peer waits on
    it inside a collective. A waiting probe therefore pauses the whole replica group between steps.
    """

    def __init__(self, lock: NodeLock | None, local_rank: int, world: int):
        self.lock, self.local_rank, self.world = lock, local_rank, world

    @contextmanager
    def __call__(self):
        if self.lock is None:
            yield
            return
        with self.lock.shared() if self.local_rank == 0 else nullcontext():
            if self.world > 1:
                dist.barrier()
            yield


def _match_threads_to_reserved_cpus() -> None:
    """Fractional CPU reservations leave torch's default (all cores) in every worker: concurrent
    trials then oversubscribe the cores and crawl. One thread per reserved core, at least one."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


def _build(job: DistillJob, mode: str, teacher_weights) -> torch.nn.Module:
    if mode == "teacher":
        return job.model.build_teacher()
    teacher = job.model.build_teacher()
    teacher.load_state_dict(_teacher_state(teacher_weights))
    student, _ = student_from_teacher(job.model.build(), teacher)
    return FRDDistiller(student, teacher)


def _teacher_state(teacher):
    """The teacher's weights: an object-store reference (no shared filesystem needed) or a local path."""
    if isinstance(teacher, ray.ObjectRef):
        return ray.get(teacher)
    return torch.load(teacher, map_location="cpu", weights_only=True)


def _param_groups(net, recipe):
    if isinstance(net, FRDDistiller):
        return net.param_groups(recipe.lr, recipe.weight_decay, recipe.rtsm_lr_mult)
    return param_groups_weight_decay(net, recipe.weight_decay, no_weight_decay_list=net.no_weight_decay())


def _cosine(total_steps: int, recipe):
    """Multiplier of each group's base lr: linear warm-up, then cosine down to min_lr."""
    floor = recipe.min_lr / recipe.lr

    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        t = min(1.0, (step - recipe.warmup_steps) / max(1, total_steps - recipe.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def _amp_dtype(device: torch.device, amp: bool):
    if not amp or device.type != "cuda":
        return None  # fp32 on CPU: CPU autocast buys little for these models and changes numerics
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _train_epoch(model, net, mode, loader, steps, optimizer, scheduler, scaler, criterion, recipe,
                 device, amp_dtype, guard, world):
    model.train()
    sums = {"loss": 0.0, "loss_cls": 0.0, "loss_token": 0.0, "loss_logits": 0.0}
    seen, step, t0 = 0, 0, time.perf_counter()
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
    for step, (x, y) in enumerate(loader, start=1):
        if step > steps:
            break
        with guard():
            with autocast:
                if mode == "distill":
                    total, parts = criterion(*model(x), y)
                else:
                    total = F.cross_entropy(model(x), y)
                    parts = {"loss": total.detach(), "loss_cls": total.detach()}
            # Every rank sees the same mean loss, so every rank stops at the same step (no hang).
            mean_loss = _all_mean(total.detach().float(), world)
            if not torch.isfinite(mean_loss):
                return {"status": "non_finite",
                        "failure": f"non-finite loss ({mean_loss.item()}) at step {step}: lower the lr or "
                                   "the loss weights", **_means(sums, seen), "train_img_s": 0.0}
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if recipe.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
        n = x.shape[0]
        seen += n
        if step % max(1, steps // 4) == 0 and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"  step {step}/{steps} loss {float(parts['loss']):.4f}", flush=True)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"status": "ok", **_means(sums, seen), "train_img_s": seen * world / max(elapsed, 1e-9),
            "lr": optimizer.param_groups[0]["lr"], "train_s": elapsed}


def _means(sums: dict, seen: int) -> dict:
    return {f"train_{k}": v / max(seen, 1) for k, v in sums.items()}


def _all_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return value


@torch.no_grad()
def _top1(model, dataset, device, amp_dtype, world) -> float:
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
    for x, y in DataLoader(dataset, batch_size=256):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            correct[0] += (model(x).argmax(-1) == y).sum()
        correct[1] += y.numel()
    if world > 1:
        dist.all_reduce(correct)
    return float(100.0 * correct[0] / correct[1].clamp_min(1))


def _replica_report(model, ctx) -> dict:
    """Which node each rank ran on, and a checksum of each rank's weights (DDP keeps them equal)."""
    checksum = float(sum(p.double().sum().item() * (i + 1) for i, p in enumerate(model.parameters())))
    mine = {"node": ray.get_runtime_context().get_node_id(), "checksum": checksum}
    everyone = [None] * ctx.get_world_size()
    if ctx.get_world_size() > 1:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    return {"worker_nodes": [e["node"] for e in everyone], "weight_checksums": [e["checksum"] for e in everyone]}


def _report(metrics, net, inference_model, optimizer, scheduler, scaler, epoch, rank) -> None:
    if rank != 0:  # only rank 0 writes; every rank must still call report (it is a barrier)
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch},
                   os.path.join(tmp, STATE_FILE))
        torch.save(inference_model.state_dict(), os.path.join(tmp, MODEL_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch_{epoch:04d}")


def _restore(checkpoint, net, optimizer, scheduler, scaler) -> int:
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return int(state["epoch"])
