"""How to adapt a data set to a model (:class:`DataOptions`) and the seeds of the fixed draws. Torch-free:
the CLI builds and checks these options before it loads torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

__all__ = ["AUGMENT_MODES", "SPLIT_SEED", "SUBSET_SEED", "VAL_FRACTION", "DataOptions"]

#: ``augment`` values; ``None`` keeps each set's default (crop + flip for CIFAR and imagefolder).
AUGMENT_MODES = ("none", "crop-flip")
#: Seed of the fixed train/validation split of the sets that have none.
SPLIT_SEED = 0
#: Fraction of such a set held out for validation.
VAL_FRACTION = 0.2
#: Seed of ``train_subset`` (the reproduction's: the same images on every machine).
SUBSET_SEED = 0


@dataclass(frozen=True)
class DataOptions:
    """How to adapt a data set to a model: the ``channels``, ``image_size``, ``augment``, ``train_subset``,
    ``download`` and ``val_fraction`` options of ``train``, ``evaluate`` and ``analyze``.

    Errors name the field (``option=`` says which), e.g. ``"channels must be 1 or 3 (got 5)"``.
    """

    channels: int | None = None
    image_size: int | None = None
    augment: str | None = None
    train_subset: int | None = None
    download: bool = False
    val_fraction: float | None = None

    def validate(self) -> DataOptions:
        if self.channels is not None and self.channels not in (1, 3):
            raise UsageError(f"channels must be 1 or 3 (got {self.channels})", option="channels")
        if self.image_size is not None and self.image_size < 1:
            raise UsageError(
                f"image_size must be a positive number of pixels (got {self.image_size})", option="image_size"
            )
        if self.augment is not None and self.augment not in AUGMENT_MODES:
            raise UsageError(
                f"augment must be one of {', '.join(AUGMENT_MODES)} (got {self.augment!r})", option="augment"
            )
        if self.train_subset is not None and self.train_subset < 1:
            raise UsageError(f"train_subset must be at least 1 (got {self.train_subset})", option="train_subset")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise UsageError(
                f"val_fraction must be between 0 and 1, e.g. 0.2 (got {self.val_fraction})", option="val_fraction"
            )
        return self
