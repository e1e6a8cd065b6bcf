"""What a training run takes: :class:`TrainConfig`, its checks, and the choices its options allow.

Errors name the option by its field name (``option="epochs"``); the CLI words it as its flag.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..data import DataOptions
from ..errors import UsageError
from ..layers import FORWARD_MODES
from ..probe import DEVICES

__all__ = ["TrainConfig", "OPTIMIZERS", "SCHEDULES", "DECAY_MODES", "DEVICES", "TRAJECTORY_FIELDS"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("paper", "step", "cosine")
DECAY_MODES = ("factors", "product")

#: Options that shape the trajectory: ``resume`` refuses to continue a run if any of them changed.
TRAJECTORY_FIELDS = (
    "data", "epochs", "batch_size", "lr", "optimizer", "momentum", "nesterov", "schedule",
    "weight_decay", "decay_on", "teacher", "kd_alpha", "kd_temperature", "nonlinear_warmup", "seed",
    "channels", "image_size", "augment", "train_subset", "accumulate", "val_fraction", "precise_bn",
)  # fmt: skip

_DATA_FIELDS = tuple(f.name for f in dataclasses.fields(DataOptions))


@dataclass
class TrainConfig:
    """Everything ``expandctl train`` takes; field names match the command's options.

    ``data`` is the data spec (``"digits"``, ``"cifar10:DIR"``, ...); ``data_options`` adapts it to the
    model (channels, image size, augmentation, training subset, download, validation fraction).
    """

    src: str
    data: str
    out: str = "run"
    epochs: int = 150
    batch_size: int = 128
    #: Mini-batches per optimizer step (gradient accumulation); fused layers compose once per step.
    accumulate: int = 1
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "paper"
    weight_decay: float = 0.0
    decay_on: str = "factors"
    teacher: str | None = None
    #: Architecture of a plain state-dict SRC / teacher (expandctl checkpoints record their own).
    arch: str | None = None
    arch_kwargs: dict | None = None
    teacher_arch: str | None = None
    teacher_arch_kwargs: dict | None = None
    kd_alpha: float = 0.9
    kd_temperature: float = 4.0
    nonlinear_warmup: int = 0
    forward: str = "fused"
    device: str = "auto"
    workers: int = 0
    seed: int = 0
    resume: bool = False
    trust_pickle: bool = False
    #: Record the minimum and mean gradient confusion on the training set after every epoch
    #: (``grad_confusion_min``/``_mean`` in metrics.jsonl; :mod:`expandctl.analysis.confusion`).
    grad_confusion: bool = False
    grad_confusion_pairs: int = 100
    #: How ``data`` is adapted to the model (:class:`expandctl.data.DataOptions`).
    data_options: DataOptions = DataOptions()
    #: After the last epoch, recompute every BatchNorm's running statistics over this many training
    #: batches with the final weights (:mod:`expandctl.train.precise_bn`); 0: off.
    precise_bn: int = 0
    #: The command line, recorded in the checkpoints' provenance.
    command: str | None = None

    @classmethod
    def from_dict(cls, values: dict, **more) -> TrainConfig:
        """A config from flat keys (``values``, then ``more``), as :meth:`to_dict` writes them: the data
        options' fields beside the others (a recipe, a checkpoint's record)."""
        values = {**values, **more}
        data = {name: values.pop(name) for name in _DATA_FIELDS if name in values}
        if data:
            values["data_options"] = DataOptions(**data)
        return cls(**values)

    def to_dict(self) -> dict:
        """Every option under its own name, the data options' fields flattened in place (what checkpoints record)."""
        flat: dict = {}
        for name, value in dataclasses.asdict(self).items():
            if name == "data_options":
                flat.update(value)
            else:
                flat[name] = value
        return flat

    def validate(self) -> TrainConfig:
        """Raise :class:`UsageError` naming the first bad option (``option=`` its field); return ``self``."""
        choices = {
            "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "decay_on": DECAY_MODES,
            "forward": FORWARD_MODES, "device": DEVICES,
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(
                    f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})", option=name
                )
        for names, ok, message in self._rules():
            if not ok:
                raise UsageError(message, option=names)
        self.data_options.validate()
        return self

    def _rules(self) -> list[tuple[str | tuple[str, ...], bool, str]]:
        """``(the options the message names, holds, message)`` for every numeric option."""
        return [
            ("epochs", self.epochs >= 1, "epochs must be at least 1"),
            ("batch_size", self.batch_size >= 1, "batch_size must be at least 1"),
            ("accumulate", self.accumulate >= 1, "accumulate must be at least 1"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            ("momentum", 0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (("nesterov", "momentum"), not self.nesterov or self.momentum != 0, "nesterov needs a non-zero momentum"),
            ("weight_decay", self.weight_decay >= 0, "weight_decay must be >= 0"),
            ("kd_alpha", 0 <= self.kd_alpha <= 1, "kd_alpha must be in [0, 1]"),
            ("kd_temperature", self.kd_temperature > 0, "kd_temperature must be > 0"),
            ("nonlinear_warmup", self.nonlinear_warmup >= 0, "nonlinear_warmup must be >= 0"),
            (
                ("nonlinear_warmup", "epochs"),
                self.nonlinear_warmup < self.epochs,
                f"nonlinear_warmup ({self.nonlinear_warmup}) must be smaller than epochs ({self.epochs}): "
                "the ReLUs must come out before training ends",
            ),
            ("workers", self.workers >= 0, "workers must be >= 0"),
            ("precise_bn", self.precise_bn >= 0, "precise_bn must be >= 0 (0: off)"),
            ("grad_confusion_pairs", self.grad_confusion_pairs >= 1, "grad_confusion_pairs must be at least 1"),
        ]
