"""Data: Fashion-MNIST from IDX files (offline default) and ImageNet-style folders.

One entry point for the rest of the project:

    spec = DataSpec(kind="fashion_mnist", img_size=32)     # patch 4 -> 64 tokens
    check_data(spec, num_classes=model.num_classes)         # cheap; the driver calls it before Ray starts
    splits = load_splits(spec)                               # Splits(train, val, test, num_classes, class_names, ...)

Splits:
- `train`/`val` are a seeded, disjoint, covering split of the *training* set (model selection,
  early stopping); `test` is the official test set (Fashion-MNIST t10k, or `root/val` for folders),
  kept apart for the final numbers.
- `train_subset`/`val_subset`/`test_subset` take the first k of a seeded permutation, so smoke runs
  touch little data and a smaller subset is always contained in a larger one.

Fashion-MNIST (60k + 10k, 28x28, 10 classes) is decoded and resized once, in batched
`F.interpolate` calls, and kept in memory as uint8 (60k x 32 x 32 = 61 MB; float would be 4x that
per Ray worker, 12x with 3 channels); items are normalised to float on the way out.
Folders use torchvision's `ImageFolder` with DeiT's timm transforms.

Every user-facing data problem raises `DataError` with one line naming the path and the fix.
"""
from __future__ import annotations

import copy
import functools
import gzip
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

KINDS = ("fashion_mnist", "folder")
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
INSTALL_HINT = (
    "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --data DIR"
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Standard Fashion-MNIST pixel statistics (train set, pixels scaled to [0, 1]).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
# The four IDX files; each may also carry a .gz suffix.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# DeiT's training recipe (deit/datasets.py build_transform), as timm create_transform arguments.
DEIT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
DEIT_COLOR_JITTER = 0.4
DEIT_RE_PROB = 0.25
DEIT_RE_MODE = "pixel"
DEIT_INTERPOLATION = "bicubic"
DEIT_CROP_PCT = 224 / 256  # eval: resize to img_size / 0.875, centre-crop img_size
# Images resized per F.interpolate call: batched, but the float intermediate stays bounded
# (8192 x 224 x 224 x 4 B = 1.6 GB at ImageNet size, 34 MB at 32 px).
_RESIZE_CHUNK = 8192


class DataError(ValueError):
    """A data problem the user can fix (missing/corrupt files, wrong paths, class-count mismatch)."""


# ---------------------------------------------------------------------------------------------
# IDX (the MNIST file format): magic 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32
# sizes, then the payload in big-endian C order.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _is_gzip(path: str) -> bool:
    # Sniff the bytes rather than trust the suffix: a renamed file still reads.
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _parse_idx_header(path: str, head: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header length) from the first bytes of an IDX file."""
    if len(head) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(head)} bytes, the header needs 4)")
    if head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number 0x{head[:4].hex()}, expected 0x0000....)")
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x} (expected one of "
                        f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise DataError(f"{path}: truncated IDX header ({len(head)} bytes, {ndim} dimensions need {header_len})")
    shape = tuple(int(d) for d in np.frombuffer(head[4:header_len], dtype=">u4"))
    return _IDX_DTYPES[code], shape, header_len


def read_idx_header(path: str) -> tuple[np.dtype, tuple[int, ...]]:
    """Dtype and shape of an IDX file (gzipped or not) without reading the payload.

    Also checks the payload length cheaply: the file size for raw files, the gzip trailer's
    uncompressed size (ISIZE, mod 2**32) for gzipped ones.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        gz = _is_gzip(path)
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) == 4:
                head += f.read(4 * head[3])
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    dtype, shape, header_len = _parse_idx_header(path, head)
    expected = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if gz:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            actual = int.from_bytes(f.read(4), "little")
        if actual != expected % 2**32:
            raise DataError(f"{path}: gzip holds {actual} bytes, the IDX header {shape} needs {expected} "
                            "(truncated or corrupt file)")
    else:
        actual = os.path.getsize(path)
        if actual != expected:
            raise DataError(f"{path}: file has {actual} bytes, the IDX header {shape} needs {expected} "
                            "(truncated or corrupt file)")
    return dtype, shape


def read_idx(path: str) -> np.ndarray:
    """The array stored in an IDX file (gzipped or not), in native byte order."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # truncated gzip -> EOFError, bad gzip -> BadGzipFile
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    dtype, shape, header_len = _parse_idx_header(path, raw)
    n = int(np.prod(shape, dtype=np.int64))
    payload = len(raw) - header_len
    if payload != n * dtype.itemsize:
        raise DataError(f"{path}: payload has {payload} bytes, the IDX header {shape} needs "
                        f"{n * dtype.itemsize} (truncated or corrupt file)")
    arr = np.frombuffer(raw, dtype=dtype, count=n, offset=header_len).reshape(shape)
    # A writable copy in native byte order (frombuffer's view of bytes is read-only).
    return np.array(arr, dtype=dtype.newbyteorder("="))


# ---------------------------------------------------------------------------------------------
@dataclass
class DataSpec:
    """What data to load and how. Validated on construction (raises DataError)."""

    kind: str = "fashion_mnist"          # fashion_mnist (IDX directory) | folder (root/train, root/val)
    root: Optional[str] = None           # directory; None -> DEFAULT_FASHION_MNIST_DIR for fashion_mnist
    img_size: int = 32                   # square side fed to the model (32 with patch 4 -> 64 tokens)
    in_chans: int = 1                    # 1 or 3 (grey images are repeated to 3 channels)
    val_fraction: float = 0.1            # share of the training set held out for validation
    seed: int = 0                        # seeds the train/val split and the subsets
    train_subset: Optional[int] = None   # keep only this many training images (smoke runs)
    val_subset: Optional[int] = None     # ... validation images
    test_subset: Optional[int] = None    # ... test images
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
        if not (0.0 < self.val_fraction < 1.0):
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
            if self.in_chans == 1:  # grey: the luminance-weighted ImageNet statistics
                mean, std = (_luma(mean),), (_luma(std),)
        mean = self.mean if self.mean is not None else mean
        std = self.std if self.std is not None else std
        if len(mean) == 1:
            mean = mean * self.in_chans
        if len(std) == 1:
            std = std * self.in_chans
        return tuple(mean[: self.in_chans]), tuple(std[: self.in_chans])


def _luma(rgb: Sequence[float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]  # PIL's convert("L") weights


@dataclass
class Splits:
    """The three datasets plus what a model and a card need to know about them."""

    train: Dataset                 # augmented (folders) training part of the training set
    val: Dataset                   # held-out part of the training set, eval transforms
    test: Dataset                  # official test set, eval transforms: final numbers only
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]        # per-channel normalisation applied to every image
    std: tuple[float, ...]


@dataclass
class DataSummary:
    """What check_data learned from headers / directory listings."""

    num_classes: int
    class_names: tuple[str, ...]
    n_train: int                   # whole training set, before the val split and subsets
    n_test: int


# ---------------------------------------------------------------------------------------------
def split_indices(
    n: int,
    val_fraction: float,
    seed: int,
    train_subset: Optional[int] = None,
    val_subset: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val split of range(n): (train_idx, val_idx), sorted, disjoint, covering.

    One permutation decides both: its first round(n * val_fraction) entries are validation, the
    rest training. A subset keeps the first k of each part in permutation order, so it is a
    seeded random sample and subsets of the same seed are nested.
    """
    if not (0.0 < val_fraction < 1.0):
        raise DataError(f"val_fraction={val_fraction} must be in (0, 1)")
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise DataError(f"val_fraction={val_fraction} of {n} training images leaves an empty "
                        f"{'validation' if n_val < 1 else 'training'} split")
    perm = np.random.default_rng(seed).permutation(n)
    val, train = perm[:n_val], perm[n_val:]
    train = _take_first(train, train_subset, "train_subset", "training")
    val = _take_first(val, val_subset, "val_subset", "validation")
    return np.sort(train), np.sort(val)


def _take_first(idx: np.ndarray, k: Optional[int], name: str, what: str) -> np.ndarray:
    if k is None:
        return idx
    if k > len(idx):
        raise DataError(f"{name}={k} but the {what} split has only {len(idx)} images")
    return idx[:k]


def _subset_test(n: int, k: Optional[int], seed: int) -> np.ndarray:
    if k is None:
        return np.arange(n)
    idx = np.random.default_rng(seed).permutation(n)
    return np.sort(_take_first(idx, k, "test_subset", "test"))


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (or any IDX directory with the same four files)
class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, C0, H, W) -> normalised float (in_chans, H, W), int64 label.

    uint8 storage keeps each Ray worker's copy small; normalising one item costs microseconds.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, in_chans: int = 1):
        assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
        assert len(images) == len(labels)
        self.images = images                     # (N, 1, H, W) uint8
        self.labels = labels.long()              # (N,)
        self.in_chans = in_chans
        # Fold /255 and the normalisation into one multiply-add: x * scale + shift.
        mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)      # (in_chans, 1, 1)
        self._shift = -mean_t / std_t

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float().expand(self.in_chans, -1, -1)  # (C, H, W); grey repeated
        return x * self._scale + self._shift, self.labels[i]


def _idx_paths(root: str) -> dict[str, str]:
    """The four IDX files in root (plain or .gz), or a DataError naming what is missing."""
    if not os.path.isdir(root):
        raise DataError(f"Fashion-MNIST directory {root} does not exist: {INSTALL_HINT}")
    paths, missing = {}, []
    for key, stem in IDX_FILES.items():
        for name in (stem + ".gz", stem):
            if os.path.isfile(os.path.join(root, name)):
                paths[key] = os.path.join(root, name)
                break
        else:
            missing.append(stem + "[.gz]")
    if missing:
        raise DataError(f"{root} lacks {', '.join(missing)}: {INSTALL_HINT}")
    return paths


def _check_idx_pair(img_path: str, img_shape, lab_path: str, lab_shape) -> None:
    if len(img_shape) != 3:
        raise DataError(f"{img_path}: expected images of shape (N, H, W), the header says {img_shape}")
    if len(lab_shape) != 1:
        raise DataError(f"{lab_path}: expected labels of shape (N,), the header says {lab_shape}")
    if img_shape[0] == 0:
        raise DataError(f"{img_path}: holds no images")
    if img_shape[0] != lab_shape[0]:
        raise DataError(f"{img_path} holds {img_shape[0]} images but {lab_path} holds {lab_shape[0]} labels")


def _class_names(num_classes: int) -> tuple[str, ...]:
    if num_classes == len(FASHION_MNIST_CLASSES):
        return FASHION_MNIST_CLASSES
    return tuple(str(i) for i in range(num_classes))  # another IDX set (MNIST-like): plain ids


def _count_classes(labels: np.ndarray, path: str) -> int:
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: negative label {int(labels.min())}")
    return int(labels.max()) + 1 if labels.size else 0


def _resize_uint8(images: np.ndarray, img_size: int) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, img_size, img_size) uint8, resized in batched chunks."""
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)  # (N, 1, H, W)
    if x.shape[-2:] == (img_size, img_size):
        return x.clone()
    out = torch.empty((len(x), 1, img_size, img_size), dtype=torch.uint8)
    for s in range(0, len(x), _RESIZE_CHUNK):
        chunk = x[s:s + _RESIZE_CHUNK].float()
        # antialias matters when shrinking (it is a no-op when enlarging).
        y = F.interpolate(chunk, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
        out[s:s + _RESIZE_CHUNK] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _check_fashion_mnist(spec: DataSpec) -> DataSummary:
    root = spec.data_dir
    paths = _idx_paths(root)
    shapes = {k: read_idx_header(p)[1] for k, p in paths.items()}
    for split in ("train", "test"):
        _check_idx_pair(paths[f"{split}_images"], shapes[f"{split}_images"],
                        paths[f"{split}_labels"], shapes[f"{split}_labels"])
    # Labels are tiny (60 KB), so read them for the true class count.
    num_classes = _count_classes(read_idx(paths["train_labels"]), paths["train_labels"])
    n_train, n_test = shapes["train_images"][0], shapes["test_images"][0]
    # Fail now, not inside a Ray worker, if the subsets cannot be met.
    split_indices(n_train, spec.val_fraction, spec.seed, spec.train_subset, spec.val_subset)
    _subset_test(n_test, spec.test_subset, spec.seed)
    return DataSummary(num_classes, _class_names(num_classes), n_train, n_test)


def _load_fashion_mnist(spec: DataSpec) -> Splits:
    root = spec.data_dir
    paths = _idx_paths(root)
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        _check_idx_pair(paths[f"{split}_images"], arrays[f"{split}_images"].shape,
                        paths[f"{split}_labels"], arrays[f"{split}_labels"].shape)
    num_classes = _count_classes(arrays["train_labels"], paths["train_labels"])
    test_max = _count_classes(arrays["test_labels"], paths["test_labels"])
    if test_max > num_classes:
        raise DataError(f"{paths['test_labels']} has label {test_max - 1} but the training labels stop at {num_classes - 1}")
    mean, std = spec.norm()
    train_idx, val_idx = split_indices(len(arrays["train_labels"]), spec.val_fraction, spec.seed,
                                       spec.train_subset, spec.val_subset)
    test_idx = _subset_test(len(arrays["test_labels"]), spec.test_subset, spec.seed)

    def make(images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> TensorImageDataset:
        # Resize only what is kept: a smoke run's subset costs almost nothing.
        x = _resize_uint8(images[idx], spec.img_size)
        y = torch.from_numpy(labels[idx].astype(np.int64))
        return TensorImageDataset(x, y, mean, std, spec.in_chans)

    return Splits(
        train=make(arrays["train_images"], arrays["train_labels"], train_idx),
        val=make(arrays["train_images"], arrays["train_labels"], val_idx),
        test=make(arrays["test_images"], arrays["test_labels"], test_idx),
        num_classes=num_classes,
        class_names=_class_names(num_classes),
        mean=mean,
        std=std,
    )


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
        # Cheap: stop at the first image of each class instead of listing them all.
        with os.scandir(os.path.join(split_dir, c)) as it:
            if not any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in it):
                raise DataError(f"{os.path.join(split_dir, c)} has no images ({', '.join(IMG_EXTENSIONS)})")
    return classes


def _check_folder(spec: DataSpec) -> tuple[tuple[str, ...], str, str]:
    root = spec.data_dir
    if not os.path.isdir(root):
        raise DataError(f"image folder root {root} does not exist (pass --data DIR holding train/ and val/)")
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "val")
    classes = _list_classes(train_dir)
    test_classes = _list_classes(test_dir)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))[:3]
        only_test = sorted(set(test_classes) - set(classes))[:3]
        raise DataError(f"{train_dir} and {test_dir} have different classes ({len(classes)} vs {len(test_classes)}; "
                        f"only in train: {only_train}, only in val: {only_test}): labels would not line up")
    return classes, train_dir, test_dir


def folder_transforms(spec: DataSpec):
    """(train, eval) transforms: DeiT's recipe from timm's transform factory."""
    from timm.data import create_transform
    mean, std = spec.norm()
    train_tf = create_transform(
        spec.img_size, is_training=True, auto_augment=DEIT_AUTO_AUGMENT, color_jitter=DEIT_COLOR_JITTER,
        re_prob=DEIT_RE_PROB, re_mode=DEIT_RE_MODE, re_count=1, interpolation=DEIT_INTERPOLATION,
        mean=mean, std=std,
    )
    eval_tf = create_transform(
        spec.img_size, is_training=False, crop_pct=DEIT_CROP_PCT, interpolation=DEIT_INTERPOLATION,
        mean=mean, std=std,
    )
    return train_tf, eval_tf


def _load_folder(spec: DataSpec) -> Splits:
    from torchvision.datasets import ImageFolder
    classes, train_dir, test_dir = _check_folder(spec)
    train_tf, eval_tf = folder_transforms(spec)
    # functools.partial, not a lambda: DataLoader workers (spawn) and Ray must pickle the loader.
    loader = functools.partial(_pil_loader, mode="L" if spec.in_chans == 1 else "RGB")
    try:
        train_aug = ImageFolder(train_dir, transform=train_tf, loader=loader)
        test = ImageFolder(test_dir, transform=eval_tf, loader=loader)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"cannot index image folder {spec.data_dir}: {e}") from None
    # The held-out part of train/ is scored like the test set, so it gets the eval transform;
    # a shallow copy shares the (possibly million-entry) sample list instead of rescanning.
    train_eval = copy.copy(train_aug)
    train_eval.transform = eval_tf
    train_idx, val_idx = split_indices(len(train_aug), spec.val_fraction, spec.seed,
                                       spec.train_subset, spec.val_subset)
    test_idx = _subset_test(len(test), spec.test_subset, spec.seed)
    mean, std = spec.norm()
    return Splits(
        train=Subset(train_aug, train_idx.tolist()),
        val=Subset(train_eval, val_idx.tolist()),
        test=test if spec.test_subset is None else Subset(test, test_idx.tolist()),
        num_classes=len(classes),
        class_names=classes,
        mean=mean,
        std=std,
    )


# ---------------------------------------------------------------------------------------------
def check_data(spec: DataSpec, num_classes: Optional[int] = None) -> DataSummary:
    """Validate the data cheaply (paths, headers, class count, subset sizes) before any worker starts.

    Reads IDX headers and labels (not the images) or lists class directories (not every file).
    `num_classes`: the model's head size; a mismatch raises DataError.
    """
    if spec.kind == "fashion_mnist":
        summary = _check_fashion_mnist(spec)
    else:
        classes, train_dir, test_dir = _check_folder(spec)
        summary = DataSummary(len(classes), classes, n_train=-1, n_test=-1)  # counting files is not cheap
    if num_classes is not None and num_classes != summary.num_classes:
        raise DataError(f"dataset {spec.data_dir} has {summary.num_classes} classes but the model has "
                        f"{num_classes}: build the model with num_classes={summary.num_classes}")
    return summary


def load_splits(spec: DataSpec) -> Splits:
    """Train / val / test datasets for a spec (see the module docstring)."""
    if spec.kind == "fashion_mnist":
        return _load_fashion_mnist(spec)
    return _load_folder(spec)
