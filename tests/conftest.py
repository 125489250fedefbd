"""Shared fixtures for the Ray tests: a private local Ray instance, tiny smoke jobs, absolute storage.

Ray Train V2 workers import `train_func` from the installed package (`pip install -e .`), never
from a test file, so everything a worker runs lives in `sweeps`/`sit_core`.
"""
from __future__ import annotations

import pytest

from sit_core.config import override
from sit_core.presets import get_preset, smoke

RAY_CPUS = 2


def tiny_job(**train):
    """`smoke(fmnist-cpu)` shrunk further: 256 train / 64 val / 64 test images, 2 steps of 32.

    `train` overrides fields of the distillation TrainSpec (e.g. epochs=2).
    """
    changes = {"data.train_subset": 256, "data.val_subset": 64, "data.test_subset": 64,
               "train.max_steps_per_epoch": 2, "train.batch_size": 32, "train.epochs": 1,
               "teacher_train.max_steps_per_epoch": 2, "teacher_train.batch_size": 32}
    return override(smoke(get_preset("fmnist-cpu")), {**changes, **{f"train.{k}": v for k, v in train.items()}})


def ray_env(mp: pytest.MonkeyPatch, lock_dir) -> None:
    """Environment every Ray process must inherit: set it before the raylet starts (undone by `mp`)."""
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.delenv("RAY_ADDRESS", raising=False)       # never join a cluster someone else started
    mp.setenv("SIT_NODE_LOCK_DIR", str(lock_dir))  # private NodeLock files: no other run's probes block us


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A private 2-CPU Ray instance for one test module (module scope: test_multinode needs none)."""
    import ray

    ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        ray_env(mp, tmp_path_factory.mktemp("locks"))
        # address="local": always our own instance, even if a `ray start` cluster runs on this node.
        ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=True)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture
def smoke_job():
    """A fresh tiny smoke job (callers may mutate it)."""
    return tiny_job()


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """Absolute Ray Train storage path (relative ones fail with ArrowInvalid)."""
    path = tmp_path_factory.mktemp("ray_storage").resolve()
    assert path.is_absolute()
    return str(path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private cache (teachers, decompressed data, latency tables) for one module, via SIT_CACHE_DIR."""
    path = str(tmp_path_factory.mktemp("cache").resolve())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIT_CACHE_DIR", path)
        yield path


# A small timm ViT that is not a preset: vit_small_patch16_224 shrunk to 32 px, patch 8 (16 patch
# tokens), 4 blocks of width 64, with 4 register tokens (its own prefix tokens besides the class token).
TINY_VIT = "vit_small_patch16_224"
TINY_VIT_KWARGS = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2, reg_tokens=4)
TINY_VIT_SETS = [arg for k, v in TINY_VIT_KWARGS.items() if k != "img_size"
                 for arg in ("--set", f"model.kwargs.{k}={v}")]


def make_image_folder(root, classes=("ant", "bee", "cat"), n_train=30, n_val=6, size=32) -> str:
    """root/train/<class>/*.png and root/val/<class>/*.png: class c is a noisy image dominated by
    colour channel c, so a model can learn it in a few steps."""
    import os

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 96, (size, size, 3))
                pixels[..., c % 3] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, split, name, f"{i}.png"))
    return str(root)
