"""Which architecture and input shape a model has, when the file does not say."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn

from ..layers.base import ExpandedLayer
from ..layers.tree import expanded_layers, set_module, walk
from ..models import SmallNet, build_arch, resolve_arch

__all__ = ["infer_arch", "infer_input_shape"]


@contextlib.contextmanager
def quiet_rng():
    """Building a model draws random initial weights; do not move the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        yield


def _base(module: nn.Module) -> nn.Module:
    """The original layer behind an expanded one (its attributes), else the module itself."""
    return getattr(module, "_template", module)


def _original(module: nn.Module) -> nn.Module:
    """``module`` with each expanded layer back to the layer it replaced (class, attributes, bias or
    none): the structure its builder made. Itself when nothing is expanded."""
    if not any(True for _ in expanded_layers(module)):
        return module
    module = copy.deepcopy(module)
    for layer, paths, inside in walk(module):
        if isinstance(layer, ExpandedLayer) and inside is None:
            original = layer.contract()
            if getattr(layer, "source_bias", True) is False:
                original.bias = None  # a branch kind's folded shift, on a layer that had no bias
            for path in paths:
                module = set_module(module, path, original)
    return module


def infer_arch(module: nn.Module) -> tuple[str, dict] | None:
    """``(spec, kwargs)`` that rebuild ``module``'s compact structure, or ``None``.

    Tried: torchvision builders defined next to the module's class (with ``num_classes`` read from
    the last layer), expandctl's SmallNet, and the class called without arguments. A candidate
    counts only if its ``repr`` (every layer attribute: eps, stride, dropout...) and its state
    dict shapes are those of ``module``, so a model built with non-default settings is not
    mistaken for the default one.
    """
    compact = _original(module)
    target_repr = repr(compact)
    target_shapes = {k: tuple(v.shape) for k, v in compact.state_dict().items()}
    cls = type(compact)
    for spec, kwargs in _arch_candidates(compact):
        try:
            with torch.device("meta"), quiet_rng(), _no_warnings():
                candidate = build_arch(spec, kwargs)
        except Exception:
            continue
        if type(candidate) is not cls or repr(candidate) != target_repr:
            continue
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == target_shapes:
            return resolve_arch(spec)[0], kwargs
    return None


@contextlib.contextmanager
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _arch_candidates(module: nn.Module) -> Iterator[tuple[str, dict]]:
    cls = type(module)
    if isinstance(module, SmallNet):
        yield "smallnet", _smallnet_kwargs(module)
    if cls.__module__.startswith("torchvision.models"):
        import torchvision.models as tvm  # lazy: torchvision.models takes seconds to import; only its models need it

        heads = _head_sizes(module)
        for name in tvm.list_models():
            builder = tvm.get_model_builder(name)
            if builder.__module__ != cls.__module__:
                continue
            for n in heads:
                yield f"torchvision.models:{name}", {"num_classes": n}
    yield f"{cls.__module__}:{cls.__qualname__}", {}


def _head_sizes(module: nn.Module) -> list[int]:
    """Likely ``num_classes``: the output size of the last Linear and of the last conv."""
    sizes = []
    layers = [_base(m) for m in module.modules()]
    for kind, attr in ((nn.Linear, "out_features"), (nn.modules.conv._ConvNd, "out_channels")):
        last = [m for m in layers if isinstance(m, kind)]
        if last:
            sizes.append(getattr(last[-1], attr))
    return list(dict.fromkeys(sizes)) or [1000]


def _smallnet_kwargs(net: SmallNet) -> dict:
    convs = [_base(m) for m in net.features if isinstance(_base(m), nn.Conv2d)]
    linears = [_base(m) for m in net.classifier if isinstance(_base(m), nn.Linear)]
    channels = [c.out_channels for c in convs]
    side = math.isqrt(linears[0].in_features // channels[-1])
    return {
        "kernel_size": convs[0].kernel_size[0],
        "in_channels": convs[0].in_channels,
        "num_classes": linears[-1].out_features,
        "channels": channels,
        "hidden": linears[0].out_features,
        "image_size": side * 2 ** len(channels),
    }


_TV_NOT_CLASSIFICATION = ("detection", "segmentation", "video", "optical_flow", "quantization")


def infer_input_shape(arch: str | None, arch_kwargs: Mapping | None, model: nn.Module | None) -> tuple[int, ...] | None:
    """A per-sample input shape that the model accepts, when it can be known; else ``None``.

    torchvision classification models: ``(3, 224, 224)`` (``image_size`` if given, 299 for
    inception_v3); SmallNet: ``(in_channels, image_size, image_size)``.
    """
    kwargs = dict(arch_kwargs or {})
    name = None
    if arch:
        canonical = resolve_arch(arch)[0]
        module_name, _, name = canonical.partition(":")
        if module_name == "expandctl.models" and name == "SmallNet":
            side = int(kwargs.get("image_size", 32))
            return (int(kwargs.get("in_channels", 3)), side, side)
        if module_name == "torchvision.models":
            import torchvision.models as tvm  # lazy: torchvision.models takes seconds to import; only its specs need it

            if name in tvm.list_models(module=tvm):
                side = int(kwargs.get("image_size", 299 if name == "inception_v3" else 224))
                return (3, side, side)
            return None
    if model is None:
        return None
    if isinstance(model, SmallNet):
        k = _smallnet_kwargs(model)
        return (k["in_channels"], k["image_size"], k["image_size"])
    module_name = type(model).__module__
    if module_name.startswith("torchvision.models.") and module_name.split(".")[2] not in _TV_NOT_CLASSIFICATION:
        side = int(getattr(model, "image_size", 299 if module_name.endswith("inception") else 224))
        return (3, side, side)
    return None
