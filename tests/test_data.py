"""sit_core.data: seeded splits, Fashion-MNIST through torchvision's reader, ImageFolder loading,
augmentation, loaders, and one-line errors that name the path and the fix."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch

from sit_core.data import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DataError,
    DataSpec,
    check_data,
    eval_loader,
    load_splits,
    split_indices,
    train_loader,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIT_CACHE_DIR", str(tmp_path / "cache"))  # decompressed files go here


def write_idx(path, arr: np.ndarray, gz: bool = False) -> str:
    """Write a uint8 array as an IDX file (magic 0x0000 0x08 ndim, big-endian sizes), gzipped when gz."""
    data = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(str(path), "wb") as f:
        f.write(data)
    return str(path)


def make_fake_fashion(root, n_train=50, n_test=20, side=28, num_classes=10, gz=True, seed=0):
    """A Fashion-MNIST-shaped IDX directory; image i is constant at 20 * label (checkable values)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = dict(zip(("train_images", "train_labels", "test_images", "test_labels"), FASHION_MNIST_FILES))
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        rng.shuffle(labels)
        images = np.broadcast_to((labels * 20)[:, None, None], (n, side, side)).astype(np.uint8)
        sfx = ".gz" if gz else ""
        write_idx(os.path.join(root, names[f"{split}_images"] + sfx), images, gz)
        write_idx(os.path.join(root, names[f"{split}_labels"] + sfx), labels, gz)
    return str(root)


def test_split_deterministic_disjoint_covering():
    tr, va = split_indices(1000, 0.1, seed=0)
    tr2, va2 = split_indices(1000, 0.1, seed=0)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(va, va2)
    assert len(va) == 100 and len(tr) == 900
    assert not set(tr) & set(va)
    assert sorted(set(tr) | set(va)) == list(range(1000))
    tr3, va3 = split_indices(1000, 0.1, seed=1)
    assert set(va3) != set(va)


def test_split_subsets_are_seeded_and_nested():
    tr, va = split_indices(1000, 0.2, seed=3)
    small_tr, small_va = split_indices(1000, 0.2, seed=3, train_subset=50, val_subset=10)
    big_tr, _ = split_indices(1000, 0.2, seed=3, train_subset=200)
    assert len(small_tr) == 50 and len(small_va) == 10
    assert set(small_tr) <= set(big_tr) <= set(tr) and set(small_va) <= set(va)
    assert small_tr.max() > 500  # a random sample, not the first 50 indices
    with pytest.raises(DataError, match="train_subset=900 but the training split has only 800"):
        split_indices(1000, 0.2, seed=3, train_subset=900)
    with pytest.raises(DataError, match="empty validation"):
        split_indices(5, 0.05, seed=0)


# -------------------------------------------------------------------------------- Fashion-MNIST
@pytest.mark.parametrize("gz", [True, False])
def test_fake_fashion_mnist_loads(tmp_path, gz):
    root = make_fake_fashion(tmp_path / "fm", gz=gz)
    spec = DataSpec(root=root, img_size=16, val_fraction=0.2, seed=0, augment=False)
    assert check_data(spec, num_classes=10)[0] == "T-shirt/top"
    s = load_splits(spec)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 20)
    assert s.num_classes == 10 and len(s.class_names) == 10
    for ds in (s.train, s.val, s.test):
        x, y = ds[3]
        assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        # Constant images stay constant through the resize: check the exact normalisation.
        expected = (20 * int(y) / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        torch.testing.assert_close(x, torch.full_like(x, expected), atol=1e-5, rtol=0)
    again = load_splits(spec)  # same spec -> same split
    assert torch.equal(again.val.labels, s.val.labels) and torch.equal(again.train.images, s.train.images)


def test_augmentation_shifts_and_flips_only_the_training_split(tmp_path):
    root = make_fake_fashion(tmp_path / "fm")
    torch.manual_seed(0)
    s = load_splits(DataSpec(root=root, augment=True))
    images = s.train.images.clone()
    images[:, :, :, :14] = 0  # left half dark: a flip or a shift is visible
    s.train.images = s.val.images = images
    train = torch.stack([s.train[0][0] for _ in range(40)])
    val = torch.stack([s.val[0][0] for _ in range(5)])
    assert len({tuple(t.flatten().tolist()) for t in train}) > 1  # random shifts/flips differ
    assert all(torch.equal(v, val[0]) for v in val)  # validation: no randomness
    assert s.train[0][0].shape == (1, 28, 28)


def test_fake_fashion_mnist_three_channels_and_subsets(tmp_path):
    root = make_fake_fashion(tmp_path / "fm")
    s = load_splits(DataSpec(root=root, img_size=8, in_chans=3, train_subset=7, val_subset=3, test_subset=4))
    assert (len(s.train), len(s.val), len(s.test)) == (7, 3, 4)
    x, _ = s.val[0]
    assert x.shape == (3, 8, 8) and torch.equal(x[0], x[2])
    batch = next(iter(torch.utils.data.DataLoader(s.train, batch_size=5)))
    assert batch[0].shape == (5, 3, 8, 8) and batch[1].shape == (5,)
    with pytest.raises(DataError, match="train_subset=100"):
        check_data(DataSpec(root=root, train_subset=100))


def test_missing_directory_has_install_hint(tmp_path):
    spec = DataSpec(root=str(tmp_path / "nowhere"))
    for fn in (check_data, load_splits):
        with pytest.raises(DataError, match=r"does not exist.*apt-get install dataset-fashion-mnist.*--data DIR"):
            fn(spec)


def test_missing_file_is_named(tmp_path):
    root = make_fake_fashion(tmp_path / "fm")
    os.remove(os.path.join(root, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(DataError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\].*dataset-fashion-mnist"):
        check_data(DataSpec(root=root))


@pytest.mark.parametrize("damage", ["truncated_gzip", "labels_short", "not_idx"])
def test_corrupt_files_are_one_line_errors(tmp_path, damage):
    root = make_fake_fashion(tmp_path / "fm")
    labels = os.path.join(root, "train-labels-idx1-ubyte.gz")
    if damage == "truncated_gzip":
        raw = open(labels, "rb").read()
        open(labels, "wb").write(raw[: len(raw) // 2])
        match = "unreadable"
    elif damage == "labels_short":
        write_idx(labels, np.zeros(49, np.uint8), gz=True)
        match = "50 images .* for 49 labels"
    else:
        with gzip.open(labels, "wb") as f:
            f.write(b"\x12\x34\x08\x01" + b"\x00" * 60)
        match = "not valid Fashion-MNIST IDX files"
    with pytest.raises(DataError, match=match) as info:
        load_splits(DataSpec(root=root))
    assert "\n" not in str(info.value)


def test_class_count_mismatch(tmp_path):
    root = make_fake_fashion(tmp_path / "fm")
    with pytest.raises(DataError, match="has 10 classes but the model has 1000"):
        check_data(DataSpec(root=root), num_classes=1000)


def test_spec_validation():
    with pytest.raises(DataError, match="not one of"):
        DataSpec(kind="cifar")
    with pytest.raises(DataError, match="needs a root"):
        DataSpec(kind="folder")
    with pytest.raises(DataError, match="in_chans"):
        DataSpec(in_chans=2)
    with pytest.raises(DataError, match="val_fraction"):
        DataSpec(val_fraction=0.0)
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------------- ImageFolder
def make_image_tree(root, classes=("cat", "dog"), n_train=4, n_val=2):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8))
                img.save(os.path.join(root, split, c, f"{i}.{'jpg' if i % 2 else 'png'}"))
    return str(root)


def test_image_folder_loads_with_deit_transforms(tmp_path):
    root = make_image_tree(tmp_path / "imgs")
    spec = DataSpec(kind="folder", root=root, img_size=16, in_chans=3, val_fraction=0.25)
    assert check_data(spec, num_classes=2) == ("cat", "dog")
    s = load_splits(spec)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 2, 4)
    assert s.num_classes == 2 and s.class_names == ("cat", "dog")
    for ds in (s.train, s.val, s.test):
        x, y = ds[0]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y in (0, 1)
    # DeiT's recipe: RandAugment + random erasing for training, resize/centre-crop for eval.
    names = [type(t).__name__ for t in s.train.dataset.transform.transforms]
    assert "RandAugment" in names and "RandomErasing" in names
    assert "CenterCrop" in [type(t).__name__ for t in s.val.dataset.transform.transforms]
    x1, _ = load_splits(DataSpec(kind="folder", root=root, img_size=16, in_chans=1)).test[0]
    assert x1.shape == (1, 16, 16)
    with pytest.raises(DataError, match="has 2 classes but the model has 1000"):
        check_data(spec, num_classes=1000)


def test_image_folder_errors(tmp_path):
    root = make_image_tree(tmp_path / "imgs")
    spec = DataSpec(kind="folder", root=root, img_size=16)
    os.makedirs(os.path.join(root, "train", "emu"))
    with pytest.raises(DataError, match="emu has no images"):
        check_data(spec)
    os.rmdir(os.path.join(root, "train", "emu"))
    os.makedirs(os.path.join(root, "val", "cow"))
    open(os.path.join(root, "val", "cow", "a.png"), "wb").close()
    with pytest.raises(DataError, match="different classes"):
        check_data(spec)
    with pytest.raises(DataError, match="does not exist"):
        check_data(DataSpec(kind="folder", root=str(tmp_path / "imgs" / "train" / "cat")))
    with pytest.raises(DataError, match="root .* does not exist"):
        load_splits(DataSpec(kind="folder", root=str(tmp_path / "none")))


# ------------------------------------------------------------------------- the real Debian files
def test_real_fashion_mnist():
    # CI installs this package; a missing directory is a setup error, not a reason to skip.
    if not os.path.isdir(DEFAULT_FASHION_MNIST_DIR):
        pytest.fail(f"{DEFAULT_FASHION_MNIST_DIR} is missing: install Debian's dataset-fashion-mnist "
                    "(apt-get install dataset-fashion-mnist)")
    spec = DataSpec()
    assert len(check_data(spec, num_classes=10)) == 10
    s = load_splits(spec)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.train.images.shape == (54000, 1, 28, 28) and s.train.images.dtype == torch.uint8
    assert sorted(torch.unique(s.test.labels).tolist()) == list(range(10))
    # Normalised with the standard statistics: roughly zero mean, unit std.
    x = torch.stack([s.val[i][0] for i in range(2000)])
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.1


def test_loaders_use_workers_only_for_decoded_images(tmp_path):
    fm = load_splits(DataSpec(root=make_fake_fashion(tmp_path / "fm")))
    folder = load_splits(DataSpec(kind="folder", root=make_image_tree(tmp_path / "imgs"), img_size=16, in_chans=3))
    assert train_loader(fm.train, 8, cpus=4).num_workers == 0          # in-memory tensors
    loader = train_loader(folder.train, 2, cpus=4, pin_memory=True)
    assert loader.num_workers == 3 and loader.persistent_workers and loader.pin_memory
    assert train_loader(folder.train, 2, cpus=1).num_workers == 0       # nothing to spare
    assert loader.prefetch_factor == 2  # two batches per worker: batch-1024 prefetching stays within host memory


def test_eval_loaders_decode_with_the_spare_cpus_and_the_val_subset_reaches_scoring(tmp_path):
    spec = DataSpec(kind="folder", root=make_image_tree(tmp_path / "imgs", n_train=8), img_size=16, in_chans=3,
                    val_fraction=0.5, val_subset=3)
    splits = load_splits(spec)
    val = eval_loader(splits.val, 2, cpus=3, pin_memory=True, persistent=True)
    assert val.num_workers == 2 and val.persistent_workers and val.pin_memory
    assert sum(len(y) for _, y in val) == 3  # --val-subset: what top-1 is scored on, not the whole held-out part
    test = eval_loader(splits.test, 2, cpus=3)
    assert test.num_workers == 2 and not test.persistent_workers  # scored once
    fm = load_splits(DataSpec(root=make_fake_fashion(tmp_path / "fm")))
    assert eval_loader(fm.val, 8, cpus=4, persistent=True).num_workers == 0  # in-memory tensors


def test_deit_randaugment_posterize_at_full_magnitude_gives_a_black_image(tmp_path):
    """DeiT's 'rand-m9-mstd0.5-inc1' asks posterize to keep 0 bits at magnitude 10 (the TF reference: a
    black image); Pillow 13 raises instead, which crashed ~1 batch of 64 in 10. The op must not raise."""
    import copy

    from PIL import Image, ImageOps
    from timm.data.auto_augment import RandAugment
    from sit_core.data import folder_transforms

    train_tf, _ = folder_transforms(DataSpec(kind="folder", root=str(tmp_path), img_size=16, in_chans=3))
    augment = next(t for t in train_tf.transforms if isinstance(t, RandAugment))
    op = copy.copy(next(o for o in augment.ops if o.name == "PosterizeIncreasing"))
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    assert np.asarray(op(img)).max() == 0                          # keep 0 bits: black
    op.magnitude = 5                                               # 4 - int(5 / 10 * 4) = 2 bits
    assert np.array_equal(np.asarray(op(img)), np.asarray(ImageOps.posterize(img, 2)))
