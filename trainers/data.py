"""Datasets for proxy training, preloaded as tensors, and a fast deterministic batch stream.

Every dataset is a function registered with `register_dataset(name)` that returns `ArrayData`:
normalised float32 images (N, C, H, W) and int64 labels for a training and a validation split,
held in memory. Proxy runs are short (hundreds of steps on small images), so a torch DataLoader's
per-step machinery (workers, collation, samplers) would cost more than the step itself; batches are
instead `index_select`s of preloaded tensors, and batch k of a run is a pure function of
(seed, k). That makes a run resumable at any step with exactly the batches a straight run sees,
which is what staged training (the quality filter's 100 steps, then the rest) needs.

Built-ins:
- ``digits``: scikit-learn's bundled 8x8 digits (real, offline; the embedded default): a fixed
  stratified 20% held out for re-ranking (``split="heldout"``), the rest split into stratified
  train/validation parts (80/20) with a fixed split seed; optionally upsampled (``image_size=16``).
- ``fashion_mnist``: the standard IDX files (gzipped or raw) from a directory; Debian's
  ``dataset-fashion-mnist`` package is found automatically.
- ``fashion_small``: 5,000 Fashion-MNIST test images at 14x14, shipped with the package
  (offline, harder than digits; see `build_fashion_small`).
- ``cifar10``: the standard python batches (``cifar-10-batches-py``) from a directory, read
  with an unpickler that only builds numpy arrays and plain containers, so a crafted file cannot
  run code; ``download=True`` fetches the official archive for users with a network.
- ``synthetic``: tiny, separable random images for tests.

This module imports torch only (not Lightning), so listing the registry stays quick.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from opsearch.errors import UserError
from opsearch.registry import register_dataset

# Where Debian's dataset packages put their files (apt-get install dataset-fashion-mnist).
FASHION_MNIST_SEARCH_PATH = (
    "/usr/share/datasets/fashion-mnist",
    "/usr/local/share/datasets/fashion-mnist",
)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"

# A fixed seed for train/validation splits: the validation set must not change with the
# training seed, or seeds could not be compared.
SPLIT_SEED = 12345
# The held-out part of a dataset without an official test set (digits): drawn with its own seed,
# before the train/validation split, so that the search never sees it.
HELDOUT_SPLIT_SEED = 54321
HELDOUT_FRACTION = 0.2
# split="search": the search's train/validation; split="heldout": train on what the search may
# see, validate on data it never saw (digits: the held-out part; fashion_mnist, cifar10: the
# official test set, which the default validation="holdout" leaves untouched).
SPLITS = ("search", "heldout")


@dataclass
class ArrayData:
    """A dataset held in memory: normalised float32 images (N, C, H, W), int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    def describe(self) -> str:
        h, w = self.image_size
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_val)} val, "
                f"{self.in_channels}x{h}x{w}, {self.num_classes} classes")


def load(name: str, **options) -> ArrayData:
    """The dataset registered as `name` (unknown names raise UserError listing the known ones)."""
    from opsearch import registry

    return registry.datasets.create(name, **options)


# ---------------------------------------------------------------------------------------------
# Batches

class BatchStream:
    """Training batches `start_step .. start_step + num_steps - 1`, each a pure function of
    (seed, step): epoch e uses a permutation drawn from seed + e, incomplete last batches are
    dropped. With `world_size > 1` (DDP) rank r takes every world_size-th sample of the global
    batch, so the ranks together see exactly the batch a single process would.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, seed: int,
                 start_step: int = 0, num_steps: int, rank: int = 0, world_size: int = 1):
        n = len(y)
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if batch_size > n:
            raise UserError(f"batch size {batch_size} is larger than the training set ({n} samples)")
        if world_size > batch_size:
            raise UserError(f"batch size {batch_size} cannot be split over {world_size} processes")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.num_steps = max(0, num_steps)
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = n // batch_size
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.num_steps

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.y), generator=g)
            self._epoch = epoch
        idx = self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]
        if self.world_size > 1:
            idx = idx[self.rank::self.world_size]
        return idx

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(step)
        if idx.device != self.x.device:
            idx = idx.to(self.x.device, non_blocking=True)
        return self.x.index_select(0, idx), self.y.index_select(0, idx)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(self.start_step, self.start_step + self.num_steps):
            yield self.batch(step)

    def grouped(self, steps_per_item: int) -> "GroupedBatches":
        """The same batches, `steps_per_item` at a time, stacked: (k, B, C, H, W), (k, B)."""
        return GroupedBatches(self, steps_per_item)


class GroupedBatches:
    """Consecutive batches of a BatchStream stacked along a new first dimension, so that a
    training loop with per-item overhead (Lightning's hooks) pays it once per k steps."""

    def __init__(self, stream: BatchStream, steps_per_item: int):
        if steps_per_item < 1:
            raise UserError(f"steps per item must be >= 1, got {steps_per_item}")
        self.stream = stream
        self.k = steps_per_item

    def __len__(self) -> int:
        return -(-self.stream.num_steps // self.k)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.stream
        stop = s.start_step + s.num_steps
        for first in range(s.start_step, stop, self.k):
            steps = range(first, min(first + self.k, stop))
            idx = torch.cat([s.indices(step) for step in steps])
            if idx.device != s.x.device:
                idx = idx.to(s.x.device, non_blocking=True)
            n = len(steps)
            x = s.x.index_select(0, idx)
            yield x.view(n, -1, *x.shape[1:]), s.y.index_select(0, idx).view(n, -1)


def shard(n: int, rank: int, world_size: int) -> slice:
    """The contiguous part of n items that rank `rank` of `world_size` evaluates."""
    per = -(-n // world_size)
    return slice(min(n, rank * per), min(n, (rank + 1) * per))


# ---------------------------------------------------------------------------------------------
# Shared preprocessing

def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: the same fraction of every class goes to validation."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = max(1, int(round(len(idx) * val_fraction))) if len(idx) > 1 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _subset(x: np.ndarray, y: np.ndarray, size: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified subset of `size` samples (all when size is None or not smaller)."""
    if size is None or size >= len(y):
        return x, y
    if size < 1:
        raise UserError(f"subset size must be >= 1, got {size}")
    _, keep = _stratified_split(y, size / len(y), seed)
    return x[keep], y[keep]


def _finish(name: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
            y_val: np.ndarray, num_classes: int, image_size: int | Sequence[int] | None) -> ArrayData:
    """uint8/float arrays (N, C, H, W) -> resized, per-channel standardised tensors."""
    def prep(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).float()
        if image_size is not None:
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            if tuple(t.shape[2:]) != size:
                t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
        return t

    xt, xv = prep(x_train), prep(x_val)
    mean = xt.mean(dim=(0, 2, 3), keepdim=True)
    std = xt.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    xt = ((xt - mean) / std).contiguous()
    xv = ((xv - mean) / std).contiguous()
    return ArrayData(name, xt, torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
                     xv, torch.from_numpy(np.asarray(y_val, dtype=np.int64)), num_classes)


def _validation_for(split: str, validation: str) -> str:
    """split="heldout" validates on the official test set, which the search's default
    validation="holdout" (a part of the training files) never touches."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return "test" if split == "heldout" else validation


def _split_or_test(x_train, y_train, x_test, y_test, validation: str, val_fraction: float,
                   train_size: int | None, val_size: int | None):
    if validation == "test":
        x_tr, y_tr, x_va, y_va = x_train, y_train, x_test, y_test
    elif validation == "holdout":
        tr, va = _stratified_split(y_train, val_fraction, SPLIT_SEED)
        x_tr, y_tr, x_va, y_va = x_train[tr], y_train[tr], x_train[va], y_train[va]
    else:
        raise UserError(f"validation must be 'holdout' or 'test', got {validation!r}")
    x_tr, y_tr = _subset(x_tr, y_tr, train_size, SPLIT_SEED)
    x_va, y_va = _subset(x_va, y_va, val_size, SPLIT_SEED + 1)
    return x_tr, y_tr, x_va, y_va


# ---------------------------------------------------------------------------------------------
# digits

@register_dataset("digits")
def digits(*, image_size: int | None = None, val_fraction: float = 0.2, train_size: int | None = None,
           split: str = "search", heldout_fraction: float = HELDOUT_FRACTION,
           data_dir: str | None = None, download: bool = False) -> ArrayData:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), offline; `image_size` upsamples.

    A fixed, stratified `heldout_fraction` of the images (20%: 359) is kept out of the search:
    ``split="search"`` (the default) splits the rest into train/validation (`val_fraction` of
    it: 1151 / 287); ``split="heldout"`` trains on all of the rest and validates on the held-out
    part, which no search decision has seen (the re-ranking stage). ``heldout_fraction=0`` keeps
    nothing back (the search then uses all 1797 images; no held-out split exists).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    y = bunch.target.astype(np.int64)
    rest, held = _heldout_split(y, split, heldout_fraction)
    if split == "heldout":
        tr, va = rest, held
    else:
        tr, va = _stratified_split(y[rest], val_fraction, SPLIT_SEED)
        tr, va = rest[tr], rest[va]
    x_tr, y_tr = _subset(x[tr], y[tr], train_size, SPLIT_SEED)
    return _finish("digits", x_tr, y_tr, x[va], y[va], 10, image_size)


def _heldout_split(labels: np.ndarray, split: str, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices the search may use, held-out indices): a fixed stratified part kept back."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if fraction == 0:
        if split == "heldout":
            raise UserError("split='heldout' needs heldout_fraction > 0")
        return np.arange(len(labels)), np.arange(0)
    return _stratified_split(labels, fraction, HELDOUT_SPLIT_SEED)


# ---------------------------------------------------------------------------------------------
# synthetic

@register_dataset("synthetic")
def synthetic(*, num_train: int = 256, num_val: int = 128, num_classes: int = 4, channels: int = 1,
              image_size: int | None = 8, seed: int = 0, split: str = "search",
              data_dir: str | None = None, download: bool = False) -> ArrayData:
    """Tiny random images, one noisy template per class: learnable in a few steps (tests).
    ``split="heldout"`` validates on fresh samples, drawn after the search's validation set."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    size = image_size or 8
    g = torch.Generator().manual_seed(seed)
    # class templates differ in pattern and in brightness, so even a few steps of a tiny
    # globally pooled network separate them
    offsets = torch.linspace(-1.5, 1.5, num_classes).view(num_classes, 1, 1, 1)
    templates = torch.randn(num_classes, channels, size, size, generator=g) + offsets

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = torch.arange(n) % num_classes
        x = templates[y] + 0.5 * torch.randn(n, channels, size, size, generator=g)
        return x.numpy(), y.numpy()

    x_tr, y_tr = make(num_train)
    x_va, y_va = make(num_val)
    if split == "heldout":
        x_va, y_va = make(num_val)
    return _finish("synthetic", x_tr, y_tr, x_va, y_va, num_classes, None)


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or raw): 2 zero bytes, a type code, the number of dimensions,
    the dimensions as big-endian uint32, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise UserError(f"{path}: IDX header says {shape} ({expected} bytes of data) "
                        f"but the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find_files(stems: dict[str, str], directories: Sequence[Path],
                suffixes: Sequence[str] = ("", ".gz")) -> dict[str, Path] | None:
    for d in directories:
        found = {}
        for key, stem in stems.items():
            for suffix in suffixes:
                p = d / (stem + suffix)
                if p.is_file():
                    found[key] = p
                    break
        if len(found) == len(stems):
            return found
    return None


# How a user asks for a download, in the words of the command line and the config file alike.
DOWNLOAD_HINT = "-O evaluator.download=true (config: download = true under [evaluator])"


def _candidate_dirs(data_dir: str | None, subdirs: Sequence[str], defaults: Sequence[str]) -> list[Path]:
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        return [base] + [base / s for s in subdirs]
    env = os.environ.get("OPSEARCH_DATA_DIR")
    dirs = []
    if env:
        dirs += [Path(env)] + [Path(env) / s for s in subdirs]
    return dirs + [Path(d) for d in defaults]


@register_dataset("fashion_mnist")
def fashion_mnist(*, data_dir: str | None = None, image_size: int | None = None,
                  validation: str = "holdout", val_fraction: float = 1 / 12,
                  train_size: int | None = None, val_size: int | None = None,
                  split: str = "search", download: bool = False) -> ArrayData:
    """Fashion-MNIST from the standard IDX files (28x28 grey, 10 classes), Debian's found by itself.

    Looks in `data_dir` (and its fashion-mnist/, FashionMNIST/raw/), else $OPSEARCH_DATA_DIR,
    else where Debian's dataset-fashion-mnist package puts the files."""
    validation = _validation_for(split, validation)
    dirs = _candidate_dirs(data_dir, ("fashion-mnist", "FashionMNIST/raw"), FASHION_MNIST_SEARCH_PATH)
    files = _find_files(FASHION_MNIST_FILES, dirs)
    if files is None and download:
        target = Path(data_dir or "data").expanduser() / "fashion-mnist"
        _download_fashion_mnist(target)
        files = _find_files(FASHION_MNIST_FILES, [target])
    if files is None:
        names = ", ".join(s + "[.gz]" for s in FASHION_MNIST_FILES.values())
        where = ", ".join(str(d) for d in dirs)
        raise UserError(f"fashion_mnist: did not find {names} in {where}; install Debian's "
                        f"dataset-fashion-mnist, pass --data-dir DIR, or download it with {DOWNLOAD_HINT}")
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        xi, yi = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if xi.ndim != 3 or yi.ndim != 1 or len(xi) != len(yi):
            raise UserError(f"fashion_mnist: {split} images {xi.shape} and labels {yi.shape} do not match")
    x_train, y_train = arrays["train_images"][:, None], arrays["train_labels"].astype(np.int64)
    x_test, y_test = arrays["test_images"][:, None], arrays["test_labels"].astype(np.int64)
    x_tr, y_tr, x_va, y_va = _split_or_test(x_train, y_train, x_test, y_test, validation,
                                            val_fraction, train_size, val_size)
    return _finish("fashion_mnist", x_tr.astype(np.float32) / 255.0, y_tr,
                   x_va.astype(np.float32) / 255.0, y_va, 10, image_size)


# A subset of Fashion-MNIST's *test* images shipped with the package (Fashion-MNIST is MIT
# licensed): an offline task harder than digits. `build_fashion_small` makes the file from the
# IDX files, so it is reproducible; it never uses the 60,000 training images, which stay free
# for a held-out reference (benchmarks/fidelity.py).
FASHION_SMALL_FILE = Path(__file__).with_name("fashion_small.npz")
FASHION_SMALL_SIZE = 14
FASHION_SMALL_PER_CLASS = (400, 100)  # train, validation images per class


@register_dataset("fashion_small")
def fashion_small(*, image_size: int | None = None, train_size: int | None = None,
                  split: str = "search", data_dir: str | None = None,
                  download: bool = False) -> ArrayData:
    """5,000 Fashion-MNIST test images at 14x14 shipped with the package (4,000 train / 1,000
    validation, stratified, 10 classes), offline; `image_size` resizes (8 for digits' cost).

    ``split="heldout"`` validates on a fixed stratified half of the 1,000 validation images
    that a search on this dataset never sees (``split="search"`` validates on the other half),
    so it is also an offline held-out task for re-ranking (`--rerank-dataset fashion_small`)."""
    if not FASHION_SMALL_FILE.is_file():
        raise UserError(f"fashion_small: {FASHION_SMALL_FILE} is missing from the installation")
    with np.load(FASHION_SMALL_FILE, allow_pickle=False) as f:
        x_tr, y_tr, x_va, y_va = (f[k] for k in ("x_train", "y_train", "x_val", "y_val"))
    searched, held = _heldout_split(y_va.astype(np.int64), split, 0.5)
    keep = held if split == "heldout" else searched
    x_va, y_va = x_va[keep], y_va[keep]
    x_tr, y_tr = _subset(x_tr, y_tr.astype(np.int64), train_size, SPLIT_SEED)
    return _finish("fashion_small", x_tr.astype(np.float32) / 255.0, y_tr,
                   x_va.astype(np.float32) / 255.0, y_va.astype(np.int64), 10, image_size)


def build_fashion_small(out: str | os.PathLike = FASHION_SMALL_FILE, data_dir: str | None = None,
                        size: int = FASHION_SMALL_SIZE,
                        per_class: tuple[int, int] = FASHION_SMALL_PER_CLASS) -> Path:
    """Write the fashion_small file: per class, `per_class` (train, val) images drawn with a fixed
    seed from Fashion-MNIST's test set, resized (antialiased) to size x size, stored as uint8."""
    dirs = _candidate_dirs(data_dir, ("fashion-mnist", "FashionMNIST/raw"), FASHION_MNIST_SEARCH_PATH)
    files = _find_files({k: FASHION_MNIST_FILES[k] for k in ("test_images", "test_labels")}, dirs)
    if files is None:
        raise UserError("build_fashion_small: Fashion-MNIST's t10k files not found "
                        f"in {', '.join(str(d) for d in dirs)}")
    x, y = read_idx(files["test_images"]), read_idx(files["test_labels"]).astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    train, val = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        train.append(idx[:per_class[0]])
        val.append(idx[per_class[0]:per_class[0] + per_class[1]])
    train, val = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))

    def shrink(images: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(images[:, None].astype(np.float32))
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return t.round().clamp(0, 255).to(torch.uint8).numpy()

    out = Path(out)
    np.savez_compressed(out, x_train=shrink(x[train]), y_train=y[train].astype(np.uint8),
                        x_val=shrink(x[val]), y_val=y[val].astype(np.uint8))
    return out


def _download_fashion_mnist(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_MNIST_FILES.values():
        _fetch(FASHION_MNIST_URL + stem + ".gz", target / (stem + ".gz"))


# ---------------------------------------------------------------------------------------------
# CIFAR-10

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, numbers, bytes/str and numpy arrays: a CIFAR batch needs
    nothing else, and refusing every other global means a crafted file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes with protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 images (N, 3, 32, 32), int64 labels)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise UserError(f"cannot read CIFAR batch {path}: {e}") from None
    except Exception as e:  # any unpickling failure: a corrupt or crafted file
        raise UserError(f"{path} is not a CIFAR-10 python batch: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR-10 python batch (not a dict)")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if not isinstance(data, np.ndarray) or labels is None:
        raise UserError(f"{path} is not a CIFAR-10 python batch (no 'data' array / 'labels')")
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise UserError(f"{path}: expected uint8 data of shape (N, 3072) and N labels, "
                        f"got {data.dtype} {data.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


@register_dataset("cifar10")
def cifar10(*, data_dir: str | None = None, image_size: int | None = None,
            validation: str = "holdout", val_fraction: float = 0.1,
            train_size: int | None = None, val_size: int | None = None,
            split: str = "search", download: bool = False) -> ArrayData:
    """CIFAR-10 from the standard python batches (cifar-10-batches-py), 32x32 RGB, 10 classes."""
    validation = _validation_for(split, validation)
    stems = {name: name for name in CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)}
    dirs = _candidate_dirs(data_dir, (CIFAR10_DIR,), ())
    files = _find_files(stems, dirs, ("",))
    if files is None and download:
        target = Path(data_dir or "data").expanduser()
        download_cifar10(target)
        files = _find_files(stems, [target / CIFAR10_DIR], ("",))
    if files is None:
        if not dirs:
            raise UserError(f"cifar10: no data directory given; pass --data-dir DIR (holding {CIFAR10_DIR}/ "
                            f"or its files) or set $OPSEARCH_DATA_DIR, or download it with {DOWNLOAD_HINT}")
        raise UserError(f"cifar10: did not find {', '.join(stems)} in {', '.join(str(d) for d in dirs)}"
                        f"; pass --data-dir DIR, or download it with {DOWNLOAD_HINT}")
    parts = [read_cifar_batch(files[name]) for name in CIFAR10_TRAIN_FILES]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = read_cifar_batch(files[CIFAR10_TEST_FILE])
    x_tr, y_tr, x_va, y_va = _split_or_test(x_train, y_train, x_test, y_test, validation,
                                            val_fraction, train_size, val_size)
    return _finish("cifar10", x_tr.astype(np.float32) / 255.0, y_tr,
                   x_va.astype(np.float32) / 255.0, y_va, 10, image_size)


def download_cifar10(target: Path) -> Path:
    """Fetch and unpack the official archive into target/cifar-10-batches-py (md5 checked)."""
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        _fetch(CIFAR10_URL, archive)
        digest = hashlib.md5(archive.read_bytes()).hexdigest()
        if digest != CIFAR10_MD5:
            raise UserError(f"cifar10 download: md5 {digest} does not match {CIFAR10_MD5}")
        wanted = {f"{CIFAR10_DIR}/{n}" for n in CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)}
        out = target / CIFAR10_DIR
        out.mkdir(exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():  # only the known regular files: no path tricks
                if member.name in wanted and member.isfile():
                    src = tar.extractfile(member)
                    with open(out / Path(member.name).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    return out


def _fetch(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        dest.unlink(missing_ok=True)
        raise UserError(f"download of {url} failed: {e}") from None


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz); tests use it."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


__all__ = ["ArrayData", "BatchStream", "GroupedBatches", "load", "read_idx", "read_cifar_batch", "write_idx",
           "download_cifar10", "shard", "digits", "synthetic", "fashion_mnist", "fashion_small",
           "build_fashion_small", "cifar10"]
