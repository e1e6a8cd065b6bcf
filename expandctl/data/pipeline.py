"""Data specs -> ``(train, val, num_classes, input_shape)``: a source's reader (:mod:`expandctl.data.registry`)
gives torch-free data; this module makes datasets of it and applies the adapters of :class:`DataOptions`.

Adapters make a set fit a model: ``channels`` (gray to RGB by replication, RGB to gray by luminance),
``image_size`` (bilinear resize), ``augment`` (``"none"`` or ``"crop-flip"``; default per set),
``train_subset`` (a stratified, seeded subset of the training split) and ``val_fraction`` (the held-out
share of an image folder without train/ and val/). Reads files; downloads only when asked; never prints.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..errors import UsageError
from .folders import folder_splits
from .options import SUBSET_SEED, DataOptions
from .raw import ArraySplits, ImageFiles
from .registry import parse_spec, source
from .transforms import Augment, TensorImages, channel_stats, crop_flip, resize, to_channels

__all__ = ["DataSplits", "load_data", "stratified_subset"]


class DataSplits(NamedTuple):
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]


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
    src = source(name)
    if arg and src.arg_is_folder and not Path(arg).exists() and not (opts.download and src.downloadable):
        raise UsageError(f"data {name}:{arg}: no such folder {arg!r}; check the path", option="data")
    if opts.val_fraction is not None and not src.takes_val_fraction:
        raise UsageError(
            f"val_fraction applies to imagefolder:DIR with class folders directly under DIR; {name} has a "
            "fixed validation split",
            option="val_fraction",
        )
    shape = tuple(int(s) for s in input_shape)[-3:] if input_shape else None
    raw = src.read(arg, opts, shape)
    if isinstance(raw, ImageFiles):
        sets = DataSplits(*folder_splits(raw, shape, augment, opts))
    else:
        sets = _adapt(_in_memory(raw, augment and opts.augment != "none"), opts, augment)
    return _subset(sets, opts.train_subset)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(a, requirements=("C", "W")))


def _in_memory(raw: ArraySplits, augment: bool) -> DataSplits:
    """The arrays as :class:`TensorImages`, with the set's default augmentation (crop + flip) if any."""
    aug = crop_flip(raw.input_shape[1]) if raw.augment and augment else ()
    stats = (raw.mean, raw.std, raw.scale)
    train = TensorImages(_tensor(raw.train_x), _tensor(raw.train_y), *stats, aug)
    val = TensorImages(_tensor(raw.val_x), _tensor(raw.val_y), *stats)
    return DataSplits(train, val, raw.num_classes, raw.input_shape)


def _adapt(sets: DataSplits, opts: DataOptions, augment: bool) -> DataSplits:
    """In-memory sets with the ``channels`` / ``image_size`` conversions and ``augment`` applied."""
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
            ds.mean, ds.std = channel_stats(ds.mean, ds.std, c)
    if not augment or opts.augment == "none":
        train.augment = ()
    elif opts.augment == "crop-flip":
        train.augment = crop_flip(h)
    return DataSplits(train, val, sets.num_classes, (c, h, w))


def stratified_subset(labels: torch.Tensor, n: int, seed: int = SUBSET_SEED) -> torch.Tensor:
    """``n`` sorted indices stratified by class (each class in proportion, the remainder to the largest
    fractions), drawn by a generator seeded with ``seed``: the same images on every machine. This is
    the reproduction's ``train_subset`` (examples/reproduce.py)."""
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


def _subset(sets: DataSplits, n: int | None) -> DataSplits:
    """``train_subset``: N training images, stratified by class, seeded (validation stays whole)."""
    if n is None:
        return sets
    train = sets.train
    if n >= len(train):
        raise UsageError(
            f"train_subset {n} is not smaller than the training split ({len(train)} images)", option="train_subset"
        )
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
    return sets._replace(train=Subset(train, idx.tolist()))
