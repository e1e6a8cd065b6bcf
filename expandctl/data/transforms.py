"""In-memory images (:class:`TensorImages`) and the batched transforms applied to them: crops, flips,
channel conversion, resizing. Augmentation runs on a whole batch at a time, which is far faster than a
per-image PIL pipeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import UsageError
from .raw import LUMA

__all__ = [
    "Augment",
    "TensorImages",
    "channel_stats",
    "crop_flip",
    "random_crop",
    "random_flip",
    "resize",
    "to_channels",
]

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


def to_channels(c: int) -> Augment:
    """Gray to RGB (the one channel replicated) or RGB to gray (luma), on a batch in [0, 1]."""

    def convert(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == c:
            return x
        if c == 3 and x.shape[1] == 1:
            return x.expand(-1, 3, -1, -1)
        if c == 1 and x.shape[1] == 3:
            return (x * torch.tensor(LUMA, dtype=x.dtype).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
        raise UsageError(f"channels {c}: cannot convert {x.shape[1]}-channel images", option="channels")

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


def channel_stats(mean: torch.Tensor, std: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation statistics for converted images: a gray image replicated to RGB keeps the gray
    statistics in each channel; a luma image gets the weighted RGB mean (and, approximately, std)."""
    if c == 3:
        return mean.expand(1, 3, 1, 1).clone(), std.expand(1, 3, 1, 1).clone()
    luma = torch.tensor(LUMA).reshape(1, 3, 1, 1)
    return (mean * luma).sum(1, keepdim=True), (std * luma).sum(1, keepdim=True)
