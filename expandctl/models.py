"""Architectures that expandctl knows by a short name, and how ``--arch`` specs are resolved.

A spec is ``module:callable`` (``torchvision.models:resnet18``, ``mypkg.models:MyNet``) or a short
name: one registered here (``smallnet``) or any torchvision classification model (``resnet18``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

import torch.nn as nn

from .errors import UsageError

__all__ = ["SmallNet", "ARCHITECTURES", "register_arch", "resolve_arch", "build_arch"]


class SmallNet(nn.Module):
    """The paper's compact CIFAR network (Guo et al. 2020, Sec. 4.1): three blocks of
    conv(k) -> BN -> ReLU -> maxpool(2) with 8, 16, 32 channels, then Linear(flat -> 64) -> ReLU ->
    Linear(64 -> classes). ``image_size`` fixes the flattened size (32 for CIFAR, 28 MNIST, 8 digits)."""

    def __init__(
        self,
        kernel_size: int = 7,
        in_channels: int = 3,
        num_classes: int = 10,
        channels: tuple[int, ...] = (8, 16, 32),
        hidden: int = 64,
        image_size: int = 32,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size = in_channels, image_size
        for c in channels:
            layers += [
                nn.Conv2d(c_in, c, kernel_size, padding=kernel_size // 2),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in, size = c, size // 2
        if size < 1:
            raise UsageError(f"image_size {image_size} is too small for {len(channels)} pooling stages")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_arch(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register a short architecture name; duplicates are refused."""
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is already registered")
    ARCHITECTURES[name] = factory


register_arch("smallnet", SmallNet)


def resolve_arch(spec: str) -> tuple[str, Callable[..., nn.Module]]:
    """``(canonical spec, factory)`` for a short name or ``module:callable``."""
    spec = spec.strip()
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        module = _import_user_module(module_name, spec)
        factory = module
        for part in attr.split("."):
            factory = getattr(factory, part, None)
            if factory is None:
                raise UsageError(f"{module_name!r} has no {attr!r} (from --arch {spec!r})")
        if not callable(factory):
            raise UsageError(f"--arch {spec!r} is not callable")
        return spec, factory
    if spec in ARCHITECTURES:
        factory = ARCHITECTURES[spec]
        return f"{factory.__module__}:{factory.__qualname__}", factory
    import torchvision.models as tvm  # lazy: torchvision.models takes seconds to import; only its specs need it

    if spec.lower() in tvm.list_models():
        return f"torchvision.models:{spec.lower()}", tvm.get_model_builder(spec.lower())
    raise UsageError(
        f"unknown architecture {spec!r}; use a torchvision model name (e.g. resnet18), "
        f"one of {', '.join(sorted(ARCHITECTURES))}, or module:callable"
    )


def _import_user_module(module_name: str, spec: str):
    """Import ``module_name``, also from the current folder, as ``uvicorn``/``gunicorn`` do for
    ``module:app``: a user's ``mymodels.py`` next to their checkpoint works in every command without
    PYTHONPATH. The folder is appended to ``sys.path``, so it never shadows an installed package."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        top = module_name.partition(".")[0]
        cwd = os.getcwd()
        if e.name != top or cwd in sys.path or "" in sys.path:
            raise UsageError(_import_failed(module_name, spec, e, cwd)) from None
    except ImportError as e:
        raise UsageError(_import_failed(module_name, spec, e, os.getcwd())) from None
    sys.path.append(cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(_import_failed(module_name, spec, e, cwd)) from None


def _import_failed(module_name: str, spec: str, e: ImportError, cwd: str) -> str:
    where = module_name.replace(".", "/")
    return (
        f"cannot import {module_name!r} for --arch {spec!r} ({e}); run expandctl from the folder that holds "
        f"{where}.py (now {cwd}), add that folder to PYTHONPATH, or install the package that provides it"
    )


def build_arch(spec: str, kwargs: dict | None = None) -> nn.Module:
    """Instantiate an architecture spec with keyword arguments (no weights are downloaded)."""
    canonical, factory = resolve_arch(spec)
    kwargs = dict(kwargs or {})
    if canonical.startswith("torchvision.models:") and kwargs.get("weights") is not None:
        raise UsageError("pretrained weights cannot be downloaded here; load them from a local file instead")
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise UsageError(f"--arch {spec!r} does not take these arguments {kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model
