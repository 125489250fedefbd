"""Input pipeline speed: JPEG decoding + DeiT's training transforms, images/s per worker CPU.

    python -m sit_core.input_benchmark                                  # 512 generated ImageNet-sized JPEGs
    python -m sit_core.input_benchmark --folder /data/imagenet --images 5000 --workers 1,3,7

A GPU distilling DeiT-S is fed by DataLoader workers that decode JPEGs and apply DeiT's training
transforms (RandomResizedCrop, flip, RandAugment m9, colour jitter, random erasing; `sit_core.data`).
This times exactly that path: an `ImageFolder` with `folder_transforms`, batches of 32 through a
DataLoader with N workers, and reports images/s and images/s per worker CPU, so the CPUs a GPU
needs are `its img/s / per-CPU rate` (e.g. an A10G distilling DeiT-S at ~450 img/s).

Generated images are 500x375 (ImageNet's typical size) of smooth random content plus noise, saved
as quality-90 JPEGs; their mean file size is printed next to ImageNet's ~110 KB, because decode
time follows the compressed size. Real data: --folder DIR (DIR/train/<class>/*.JPEG).
Limits: one pass after a warm-up batch; a shared machine makes the figure noisy; the per-CPU
rate assumes one busy core per worker (the main process only collates).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

BATCH = 32
WIDTH, HEIGHT = 500, 375       # ImageNet's most common size
NOISE = 25                     # pixel noise (std) on smooth content: ~108 KB quality-90 JPEGs, ImageNet-like
IMAGENET_MEAN_JPEG_KB = 110    # ImageNet train: ~140 GB / 1.28M images
DEIT_S_IMG_S_A10G = 450        # the figure: an A10G distilling DeiT-S


def make_folder(root: str, images: int, classes: int = 4, size=(WIDTH, HEIGHT), seed: int = 0) -> str:
    """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG of smooth random images (seeded)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", classes)):
        for i in range(n):
            d = os.path.join(root, split, f"c{i % classes}")
            os.makedirs(d, exist_ok=True)
            low = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            pixels = np.asarray(low, dtype=np.int16) + rng.normal(0, NOISE, (size[1], size[0], 3)).astype(np.int16)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i}.JPEG"), quality=90)
    return root


def time_loader(dataset, workers: int, batch: int = BATCH) -> dict:
    """One pass over `dataset` after a warm-up batch: images/s and per worker CPU."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                        prefetch_factor=2 if workers else None)
    it = iter(loader)
    first = next(it)                    # worker start-up and the first batch are not timed
    seen, t0 = 0, time.perf_counter()
    for x, _ in it:
        seen += len(x)
    elapsed = time.perf_counter() - t0
    img_s = seen / elapsed if seen else float("nan")
    cpus = max(1, workers)              # workers=0: the main process decodes
    return {"workers": workers, "images": seen + len(first[0]), "timed": seen, "seconds": round(elapsed, 2),
            "img_s": round(img_s, 1), "img_s_per_cpu": round(img_s / cpus, 1)}


def run(folder: str, images: int, workers: Sequence[int], img_size: int = 224) -> list[dict]:
    from .data import DataSpec, folder_transforms
    from torchvision.datasets import ImageFolder

    train_tf, _ = folder_transforms(DataSpec(kind="folder", root=folder, img_size=img_size, in_chans=3))
    data = ImageFolder(os.path.join(folder, "train"), transform=train_tf)
    data = Subset(data, range(min(images, len(data))))
    return [time_loader(data, w) for w in workers]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def mean_kb(folder: str, limit: int = 2000) -> float:
    sizes = []
    for root, _, files in os.walk(os.path.join(folder, "train")):
        sizes += [os.path.getsize(os.path.join(root, f)) for f in files[:limit]]
        if len(sizes) >= limit:
            break
    return sum(sizes) / max(1, len(sizes)) / 1024


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sit_core.input_benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", help="an image folder with train/<class>/ (default: generate one in a temp dir)")
    p.add_argument("--images", type=int, default=512, help="images timed per setting (default: %(default)s)")
    p.add_argument("--workers", default="1,2", help="DataLoader worker counts to time (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=224, help="crop size (default: %(default)s)")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    if args.images < 2 * BATCH:
        p.error(f"--images {args.images}: time at least {2 * BATCH} (one warm-up batch of {BATCH} is not timed)")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or make_folder(tmp, args.images)
        rows = run(folder, args.images, workers, args.img_size)
        kb = mean_kb(folder)
    import PIL
    import torchvision
    print(f"{'workers':>7} {'images':>6} {'seconds':>7} {'img/s':>7} {'img/s per CPU':>13}")
    for r in rows:
        print(f"{r['workers']:>7} {r['images']:>6} {r['seconds']:>7} {r['img_s']:>7} {r['img_s_per_cpu']:>13}")
    best = max(r["img_s_per_cpu"] for r in rows)
    print(f"Protocol: {'generated' if not args.folder else args.folder} JPEGs, mean {kb:.0f} KB "
          f"(ImageNet ~{IMAGENET_MEAN_JPEG_KB} KB), DeiT train transforms at {args.img_size}px, batch {BATCH}, "
          f"one pass after a warm-up batch; {cpu_name()} ({os.cpu_count()} logical "
          f"cpus), torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__}")
    print(f"Feeding {DEIT_S_IMG_S_A10G} img/s (DeiT-S distillation on an A10G) takes ~{DEIT_S_IMG_S_A10G / best:.1f} "
          f"worker CPUs at {best} img/s per CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
