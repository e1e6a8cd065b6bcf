"""``imagefolder:DIR``: your own images, ``DIR/CLASS/*`` or ``DIR/train/CLASS/*`` and ``DIR/val/CLASS/*``.

The listing follows torchvision's ``ImageFolder`` (class folders sorted, files walked in sorted order,
the same image extensions); :mod:`expandctl.data.folders` reads the files.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import UsageError
from ..raw import ImageFiles
from ..registry import DataSource, register

#: torchvision's ``IMG_EXTENSIONS``.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_images(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(path, label), ...])`` of the class folders under ``root``, as ``ImageFolder`` lists them."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise UsageError(f"imagefolder: Couldn't find any class folder in {root}.")
    samples: list[tuple[str, int]] = []
    empty = []
    for label, cls in enumerate(classes):
        before = len(samples)
        for folder, _, names in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
            for name in sorted(names):
                if name.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(folder, name), label))
        if len(samples) == before:
            empty.append(cls)
    if empty:
        raise UsageError(
            f"imagefolder: Found no valid file for the classes {', '.join(sorted(empty))}. "
            f"Supported extensions are: {', '.join(IMG_EXTENSIONS)}"
        )
    return classes, samples


def read(arg: str | None, options, shape) -> ImageFiles:
    root = Path(arg)
    present = [s for s in ("train", "val") if (root / s).is_dir()]
    if len(present) == 1:
        lacking = "val" if present == ["train"] else "train"
        raise UsageError(
            f"imagefolder: {root} has {present[0]}/ but lacks {lacking}/ (expected train/CLASS/* and "
            "val/CLASS/*, or class folders directly under it)"
        )
    if not present:
        classes, samples = list_images(root)
        return ImageFiles(root, classes, samples)
    if options.val_fraction is not None:
        raise UsageError(
            f"imagefolder: {root} has its own train/ and val/ split; val_fraction applies to class folders "
            "directly under DIR",
            option="val_fraction",
        )
    classes, train = list_images(root / "train")
    val_classes, val = list_images(root / "val")
    if classes != val_classes:
        raise UsageError(f"imagefolder: {root}/train and {root}/val have different class folders")
    return ImageFiles(root, classes, train, val)


register(
    DataSource(
        "imagefolder",
        "imagefolder:DIR",
        "DIR/train/CLASS/* and DIR/val/CLASS/*, or DIR/CLASS/* split per class (val_fraction)",
        read,
        order=70,
        takes_val_fraction=True,
        doc="your own images, torchvision `ImageFolder`: class folders directly under DIR (`DIR/CLASS/*.png`), "
        "or `DIR/train/CLASS/*` and `DIR/val/CLASS/*`; any size, resized to the model's input (RGB, or "
        "`--channels 1`)",
        split="per class, `--val-fraction` (0.2) held out, seeded; or train / val",
    )
)
