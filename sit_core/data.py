"""Data: Fashion-MNIST (the offline default) and ImageNet-style folders, split the same way.

    spec = DataSpec(kind="fashion_mnist", img_size=28)      # patch 4 -> 49 tokens
    check_data(spec, num_classes=10)                         # the driver calls it before Ray starts
    splits = load_splits(spec)                               # Splits(train, val, test, num_classes, ...)

- `train`/`val` are a seeded, disjoint, covering split of the *training* set (model selection);
  `test` is the official test set (Fashion-MNIST t10k, or `root/val` for folders), for final numbers.
- `train_subset`/`val_subset`/`test_subset` take the first k of a seeded permutation, so a smaller
  subset is always contained in a larger one.
- Fashion-MNIST is read by torchvision's `FashionMNIST` (its IDX reader) from Debian's
  `dataset-fashion-mnist` files; they are gzipped, which torchvision's reader does not open, so they
  are decompressed once into the cache. Images stay uint8 in memory (a copy per Ray worker) and are
  normalised on the way out; `augment` adds a random 2-pixel shift and a horizontal flip.
- Folders use torchvision's `ImageFolder` with DeiT's timm transforms.

Every user-facing data problem raises `DataError` with one line naming the path and the fix.
"""
from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .files import atomic_write, cache_dir

KINDS = ("fashion_mnist", "folder")
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
INSTALL_HINT = "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --data DIR"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Standard Fashion-MNIST pixel statistics (train set, pixels scaled to [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
# DeiT's training recipe (deit/datasets.py build_transform), as timm create_transform arguments.
DEIT_TRAIN_TRANSFORM = dict(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, re_prob=0.25, re_mode="pixel",
                            re_count=1, interpolation="bicubic")
DEIT_CROP_PCT = 224 / 256  # eval: resize to img_size / 0.875, centre-crop img_size


class DataError(ValueError):
    """A data problem the user can fix (missing/corrupt files, wrong paths, class-count mismatch)."""


@dataclass
class DataSpec:
    """What data to load and how. Validated on construction (raises DataError)."""

    kind: str = "fashion_mnist"          # fashion_mnist (IDX directory) | folder (root/train, root/val)
    root: Optional[str] = None           # directory; None -> DEFAULT_FASHION_MNIST_DIR for fashion_mnist
    img_size: int = 28                   # square side fed to the model
    in_chans: int = 1                    # 1 or 3 (grey images are repeated to 3 channels)
    val_fraction: float = 0.1            # share of the training set held out for validation
    seed: int = 0                        # seeds the train/val split and the subsets
    train_subset: Optional[int] = None   # keep only this many training images (smoke runs)
    val_subset: Optional[int] = None     # ... validation images
    test_subset: Optional[int] = None    # ... test images
    augment: bool = True                 # training augmentation (shift + flip; DeiT's recipe for folders)
    mean: Optional[tuple[float, ...]] = None  # None -> Fashion-MNIST's (grey) or ImageNet's (folder)
    std: Optional[tuple[float, ...]] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DataError(f"data kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "folder" and not self.root:
            raise DataError("data kind 'folder' needs a root directory holding train/ and val/ (pass --data DIR)")
        if int(self.img_size) < 1:
            raise DataError(f"img_size={self.img_size} must be a positive number of pixels")
        if self.in_chans not in (1, 3):
            raise DataError(f"in_chans={self.in_chans} must be 1 or 3")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        for name in ("train_subset", "val_subset", "test_subset"):
            k = getattr(self, name)
            if k is not None and int(k) < 1:
                raise DataError(f"{name}={k} must be a positive number of images (or None for all)")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                v = tuple(float(x) for x in (v if isinstance(v, Sequence) else (v,)))
                if len(v) not in (1, self.in_chans):
                    raise DataError(f"{name}={v} needs 1 or in_chans={self.in_chans} values")
                setattr(self, name, v)
        if self.std is not None and any(s <= 0 for s in self.std):
            raise DataError(f"std={self.std} must be positive")

    @property
    def data_dir(self) -> str:
        return os.path.expanduser(self.root) if self.root else DEFAULT_FASHION_MNIST_DIR

    def norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel, with the kind's defaults filled in."""
        if self.kind == "fashion_mnist":
            mean, std = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
        else:
            from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
            mean, std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
            if self.in_chans == 1:  # grey: the luminance-weighted ImageNet statistics (PIL's "L")
                mean, std = (_luma(mean),), (_luma(std),)
        mean = self.mean if self.mean is not None else mean
        std = self.std if self.std is not None else std
        return _per_channel(mean, self.in_chans), _per_channel(std, self.in_chans)


def _luma(rgb: Sequence[float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _per_channel(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    return tuple((values * in_chans)[:in_chans]) if len(values) == 1 else tuple(values[:in_chans])


@dataclass
class Splits:
    """The three datasets plus what a model and a card need to know about them."""

    train: Dataset                 # augmented training part of the training set
    val: Dataset                   # held-out part of the training set, eval transforms
    test: Dataset                  # official test set, eval transforms: final numbers only
    num_classes: int
    class_names: tuple[str, ...]


def split_indices(n: int, val_fraction: float, seed: int, train_subset: Optional[int] = None,
                  val_subset: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val split of range(n): (train_idx, val_idx), sorted, disjoint, covering.

    One permutation decides both: its first round(n * val_fraction) entries are validation, the
    rest training. A subset keeps the first k of each part in permutation order, so subsets of the
    same seed are nested.
    """
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise DataError(f"val_fraction={val_fraction} of {n} training images leaves an empty "
                        f"{'validation' if n_val < 1 else 'training'} split")
    perm = np.random.default_rng(seed).permutation(n)
    val = _first(perm[:n_val], val_subset, "val_subset", "validation")
    train = _first(perm[n_val:], train_subset, "train_subset", "training")
    return np.sort(train), np.sort(val)


def _first(idx: np.ndarray, k: Optional[int], name: str, what: str) -> np.ndarray:
    if k is not None and k > len(idx):
        raise DataError(f"{name}={k} but the {what} split has only {len(idx)} images")
    return idx if k is None else idx[:k]


def _test_indices(n: int, k: Optional[int], seed: int) -> np.ndarray:
    return np.sort(_first(np.random.default_rng(seed).permutation(n), k, "test_subset", "test"))


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
class TensorImages(Dataset):
    """uint8 images (N, 1, H, W) in memory -> normalised float (in_chans, H, W), int64 label."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, in_chans: int, augment: bool):
        from torchvision.transforms import v2

        self.images, self.labels, self.in_chans = images, labels.long(), in_chans
        steps = [v2.RandomCrop(images.shape[-1], padding=2), v2.RandomHorizontalFlip()] if augment else []
        self.transform = v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].expand(self.in_chans, -1, -1)  # grey repeated to 3 channels if asked
        return self.transform(x), self.labels[i]


def _raw_fashion_mnist_root(data_dir: str) -> str:
    """A root whose FashionMNIST/raw holds the four uncompressed files torchvision reads."""
    if not os.path.isdir(data_dir):
        raise DataError(f"Fashion-MNIST directory {data_dir} does not exist: {INSTALL_HINT}")
    found = {name: next((p for p in (os.path.join(data_dir, name), os.path.join(data_dir, name + ".gz"))
                         if os.path.isfile(p)), None) for name in FASHION_MNIST_FILES}
    missing = [name + "[.gz]" for name, path in found.items() if path is None]
    if missing:
        raise DataError(f"{data_dir} lacks {', '.join(missing)}: {INSTALL_HINT}")
    key = hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:12]
    root = cache_dir("data", f"fashion-mnist-{key}")
    raw = root / "FashionMNIST" / "raw"
    for name, src in found.items():
        dest = raw / name
        if dest.exists() and dest.stat().st_mtime >= os.path.getmtime(src):
            continue
        opener = gzip.open if src.endswith(".gz") else open
        try:
            with opener(src, "rb") as f_in:  # atomic: concurrent Ray workers may read it meanwhile
                atomic_write(dest, lambda f_out: shutil.copyfileobj(f_in, f_out))
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a truncated stream is EOFError
            raise DataError(f"{src}: unreadable ({type(e).__name__}: {e})") from None
    return str(root)


@functools.lru_cache(maxsize=4)
def _fashion_mnist_arrays(data_dir: str):
    from torchvision.datasets import FashionMNIST

    root = _raw_fashion_mnist_root(data_dir)
    try:
        train, test = FashionMNIST(root, train=True), FashionMNIST(root, train=False)
    except (AssertionError, RuntimeError, ValueError) as e:  # torchvision asserts on malformed IDX files
        raise DataError(f"{data_dir}: not valid Fashion-MNIST IDX files ({type(e).__name__}: {e})") from None
    for ds in (train, test):
        if ds.data.ndim != 3 or len(ds.data) != len(ds.targets) or len(ds.data) == 0:
            raise DataError(f"{data_dir}: {len(ds.data)} images of shape {tuple(ds.data.shape[1:])} "
                            f"for {len(ds.targets)} labels: corrupt or mismatched IDX files")
    if int(test.targets.max()) > int(train.targets.max()):
        raise DataError(f"{data_dir}: the test labels go up to {int(test.targets.max())}, "
                        f"the training labels only to {int(train.targets.max())}")
    return train.data, train.targets, test.data, test.targets, train.classes


def _load_fashion_mnist(spec: DataSpec) -> Splits:
    from torchvision.transforms.v2.functional import resize

    x_train, y_train, x_test, y_test, classes = _fashion_mnist_arrays(spec.data_dir)
    num_classes = int(y_train.max()) + 1
    names = tuple(classes) if len(classes) == num_classes else tuple(str(i) for i in range(num_classes))
    train_idx, val_idx = split_indices(len(y_train), spec.val_fraction, spec.seed, spec.train_subset, spec.val_subset)
    test_idx = _test_indices(len(y_test), spec.test_subset, spec.seed)
    mean, std = spec.norm()

    def make(images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray, augment: bool) -> TensorImages:
        x = images[torch.from_numpy(idx)].unsqueeze(1)  # (N, 1, H, W) uint8; only what is kept
        if x.shape[-1] != spec.img_size:
            x = resize(x, [spec.img_size, spec.img_size], antialias=True)
        return TensorImages(x, labels[torch.from_numpy(idx)], mean, std, spec.in_chans, augment)

    return Splits(train=make(x_train, y_train, train_idx, spec.augment), val=make(x_train, y_train, val_idx, False),
                  test=make(x_test, y_test, test_idx, False), num_classes=num_classes, class_names=names)


# ---------------------------------------------------------------------------------------------
# ImageNet-style folders: root/train/<class>/*.jpg, root/val/<class>/*.jpg
def _pil_loader(path: str, mode: str):
    from PIL import Image
    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def _list_classes(split_dir: str) -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    if not os.path.isdir(split_dir):
        raise DataError(f"image folder {split_dir} does not exist (expected root/train/<class>/*.jpg and root/val/<class>/*.jpg)")
    classes = tuple(sorted(e.name for e in os.scandir(split_dir) if e.is_dir()))
    if not classes:
        raise DataError(f"{split_dir} has no class subdirectories (expected {split_dir}/<class>/*.jpg)")
    for c in classes:
        with os.scandir(os.path.join(split_dir, c)) as it:  # stop at the first image: cheap on ImageNet
            if not any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in it):
                raise DataError(f"{os.path.join(split_dir, c)} has no images ({', '.join(IMG_EXTENSIONS)})")
    return classes


def _folder_classes(spec: DataSpec) -> tuple[str, ...]:
    root = spec.data_dir
    if not os.path.isdir(root):
        raise DataError(f"image folder root {root} does not exist (pass --data DIR holding train/ and val/)")
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "val")
    classes, test_classes = _list_classes(train_dir), _list_classes(test_dir)
    if test_classes != classes:
        raise DataError(f"{train_dir} and {test_dir} have different classes ({len(classes)} vs {len(test_classes)}; "
                        f"only in train: {sorted(set(classes) - set(test_classes))[:3]}, "
                        f"only in val: {sorted(set(test_classes) - set(classes))[:3]}): labels would not line up")
    return classes


def folder_transforms(spec: DataSpec):
    """(train, eval) transforms: DeiT's recipe from timm's transform factory."""
    from timm.data import create_transform
    mean, std = spec.norm()
    train_tf = create_transform(spec.img_size, is_training=spec.augment, mean=mean, std=std,
                                **(DEIT_TRAIN_TRANSFORM if spec.augment else {"crop_pct": DEIT_CROP_PCT}))
    _keep_zero_bits(train_tf)
    eval_tf = create_transform(spec.img_size, is_training=False, crop_pct=DEIT_CROP_PCT, interpolation="bicubic",
                               mean=mean, std=std)
    return train_tf, eval_tf


def _keep_zero_bits(transform) -> None:
    """DeiT's RandAugment ('inc1', magnitude noise mstd0.5) asks its posterize op to keep 0 bits at the
    top magnitude: a black image in the TF reference and in older Pillow, a ValueError in Pillow 13
    ('bits must be between or equal to 1 and 8'), which crashed ~0.16% of images, a batch of 64 in
    ten, a whole ImageNet epoch for sure. The op gets the reference's answer back."""
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", ()):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize op, with 0 bits kept meaning a black image (as TF's `x >> 8 << 8`)."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def _load_folder(spec: DataSpec) -> Splits:
    from torchvision.datasets import ImageFolder
    classes = _folder_classes(spec)
    train_tf, eval_tf = folder_transforms(spec)
    # functools.partial, not a lambda: DataLoader workers and Ray must pickle the loader.
    loader = functools.partial(_pil_loader, mode="L" if spec.in_chans == 1 else "RGB")
    train = ImageFolder(os.path.join(spec.data_dir, "train"), transform=train_tf, loader=loader)
    test = ImageFolder(os.path.join(spec.data_dir, "val"), transform=eval_tf, loader=loader)
    # The held-out part of train/ is scored like the test set; a shallow copy shares the sample list.
    train_eval = copy.copy(train)
    train_eval.transform = eval_tf
    train_idx, val_idx = split_indices(len(train), spec.val_fraction, spec.seed, spec.train_subset, spec.val_subset)
    test_idx = _test_indices(len(test), spec.test_subset, spec.seed)
    return Splits(train=Subset(train, train_idx.tolist()), val=Subset(train_eval, val_idx.tolist()),
                  test=Subset(test, test_idx.tolist()), num_classes=len(classes), class_names=classes)


# ---------------------------------------------------------------------------------------------
def check_data(spec: DataSpec, num_classes: Optional[int] = None) -> tuple[str, ...]:
    """Validate the data before any worker starts; returns the class names.

    Fashion-MNIST is simply loaded (well under a second, and cached for the process); a folder is
    checked by listing its class directories, not every file. `num_classes`: the model's head.
    """
    if spec.kind == "fashion_mnist":
        classes = load_splits(spec).class_names
    else:
        classes = _folder_classes(spec)
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f"dataset {spec.data_dir} has {len(classes)} classes but the model has {num_classes}: "
                        f"use --num-classes {len(classes)} (a teacher with another head needs --finetune-teacher first)")
    return classes


def loader_workers(dataset: Dataset, cpus: float) -> int:
    """DataLoader worker processes for `dataset` on `cpus` reserved CPUs: in-memory tensors need none;
    decoded images (JPEG folders) get the CPUs but one (the training process keeps that one)."""
    in_memory = isinstance(getattr(dataset, "dataset", dataset), TensorImages)
    return 0 if in_memory else max(0, int(cpus) - 1)


def train_loader(dataset: Dataset, batch_size: int, *, cpus: float = 1, pin_memory: bool = False) -> DataLoader:
    """Shuffled training batches, decoded by `loader_workers` processes kept alive across epochs and
    each prefetching two batches (more would hold gigabytes of pinned host memory at batch 1024)."""
    workers = loader_workers(dataset, cpus)
    # full batches only, unless the (small, user's own) folder holds less than one: then one short batch,
    # not an epoch of no steps at all
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size,
                      num_workers=workers, persistent_workers=workers > 0, prefetch_factor=2 if workers else None,
                      pin_memory=pin_memory)


def eval_loader(dataset: Dataset, batch_size: int, *, cpus: float = 1, pin_memory: bool = False,
                persistent: bool = False) -> DataLoader:
    """Batches in order for scoring, decoded like `train_loader`'s; `persistent` keeps the workers
    alive between epochs (validation runs every epoch, the test set once)."""
    workers = loader_workers(dataset, cpus)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=persistent and workers > 0, prefetch_factor=2 if workers else None,
                      pin_memory=pin_memory)


def load_splits(spec: DataSpec) -> Splits:
    """Train / val / test datasets for a spec (see the module docstring)."""
    return _load_fashion_mnist(spec) if spec.kind == "fashion_mnist" else _load_folder(spec)
