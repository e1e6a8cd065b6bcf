"""Rebuilding a model from a checkpoint's recipe, and checking that weights fit it.

``build_arch(spec, kwargs)`` -> ``apply_layout(model, layout)`` (the expanded layers) ->
:func:`apply_folds` (BatchNorm folded by ``contract --fold-bn``) -> :func:`add_biases` (biases a
contraction left on layers that had none) -> ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import UnsafeInputError, UsageError
from ..layers.base import TEMPLATE_ATTRIBUTES
from ..layers.tree import apply_layout, expanded_layers, set_module
from ..models import build_arch
from .infer import quiet_rng

__all__ = ["apply_folds", "add_biases", "rebuild", "check_rebuild", "load_into"]


def apply_folds(model: nn.Module, folded: Sequence[Mapping[str, str]]) -> None:
    """Rebuild the structure :func:`expandctl.fold.fold_batchnorm` left (conv with bias, Identity for BN)."""
    for pair in folded:
        try:
            conv = model.get_submodule(pair["conv"])
            model.get_submodule(pair["bn"])
        except (AttributeError, KeyError, TypeError):
            raise UsageError(
                f"folded BatchNorm {dict(pair)} does not exist in this architecture (corrupt header)"
            ) from None
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device))
        if not pair.get("neutral"):  # a neutralised BatchNorm stays; its state comes with the weights
            set_module(model, pair["bn"], nn.Identity())


def add_biases(model: nn.Module, paths: Sequence[str]) -> None:
    """Give the layers at ``paths`` a (zero) bias: the structure of a contracted checkpoint whose
    branch shifts stayed on convs that had none (recorded as ``added_bias``)."""
    for path in paths:
        try:
            layer = model.get_submodule(path)
        except (AttributeError, KeyError, TypeError):
            raise UsageError(f"added bias at {path!r} does not exist in this architecture (corrupt header)") from None
        if getattr(layer, "bias", "missing") is None:
            layer.bias = nn.Parameter(
                torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device)
            )


def rebuild(
    spec: str, kwargs: dict, lay: dict, folded: Sequence[Mapping], added: Sequence[str] = (), device: str | None = None
) -> nn.Module:
    with quiet_rng(), torch.device(device) if device else contextlib.nullcontext():
        model = build_arch(spec, kwargs)
        if lay:
            model = apply_layout(model, lay, inplace=True)
        apply_folds(model, folded)
        add_biases(model, added)
    return model


def check_rebuild(
    spec: str, kwargs: dict, lay: dict, folded: Sequence[Mapping], state: Mapping, model: nn.Module
) -> list[str]:
    """Check that ``spec`` rebuilds a model taking ``state``; returns the layers that need a bias the
    architecture does not give them (contracted branch layers whose shift stayed on the conv)."""
    try:
        skeleton = rebuild(spec, kwargs, lay, folded, device="meta")
    except (UsageError, UnsafeInputError):
        raise
    except Exception:  # some builders compute on tensors in __init__; the meta device cannot
        skeleton = rebuild(spec, kwargs, lay, folded)
    expected = skeleton.state_dict()
    added = []
    for key in state:
        path, _, name = key.rpartition(".")
        if name == "bias" and key not in expected:
            with contextlib.suppress(AttributeError):
                layer = skeleton.get_submodule(path)
                if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) and layer.bias is None:
                    added.append(path)
    if added:
        add_biases(skeleton, added)
    problem = _mismatch(skeleton.state_dict(), state)
    if not problem:
        return added
    inside, outside = _split_mismatch(skeleton.state_dict(), state, lay)
    if outside is None and not _arch_changes_expanded_layers(spec, kwargs, folded, model, lay):
        # The arch rebuilds every compact layer as the model has it; only the expanded layers, rebuilt
        # from the layout they record, differ: a layer's config() does not describe its own structure.
        raise RuntimeError(
            f"the layout recorded for the expanded layers does not rebuild them ({inside}), although --arch "
            f"{spec} rebuilds the compact model: a bug in expandctl (or in a custom expansion kind's config())"
        )
    raise UsageError(
        f"--arch {spec} {json.dumps(kwargs)} does not rebuild this model ({problem}); pass the right --arch"
    )


def _under(key: str, lay: Mapping) -> bool:
    return any(key.startswith(f"{path}.") for path in lay)


def _split_mismatch(expected: Mapping, given: Mapping, lay: Mapping) -> tuple[str | None, str | None]:
    """``(mismatch inside the expanded layers of lay, mismatch elsewhere)``."""
    parts = []
    for inside in (True, False):
        parts.append(
            _mismatch(
                {k: v for k, v in expected.items() if _under(k, lay) == inside},
                {k: v for k, v in given.items() if _under(k, lay) == inside},
            )
        )
    return parts[0], parts[1]


def _arch_changes_expanded_layers(spec: str, kwargs: dict, folded, model: nn.Module, lay: Mapping) -> bool:
    """Whether the arch builds any expanded layer's compact layer other than the model's original."""
    try:
        compact = rebuild(spec, kwargs, {}, folded, device="meta")
    except Exception:  # some builders compute on tensors in __init__; the meta device cannot
        compact = rebuild(spec, kwargs, {}, folded)
    for path in lay:
        try:
            built, original = compact.get_submodule(path), model.get_submodule(path)._template
        except AttributeError:
            return True
        if type(built) is not type(original) or any(
            getattr(built, a, None) != getattr(original, a, None) for a in TEMPLATE_ATTRIBUTES
        ):
            return True
    return False


def _mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > 3 else ""
            parts.append(f"{label} {', '.join(items[:3])}{more}")
    return "; ".join(parts) or None


def load_into(model: nn.Module, state: Mapping[str, Any], path: Path, spec: str, kwargs: dict) -> None:
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"the state dict in {str(path)!r} holds non-tensor values (corrupt)")
    problem = _mismatch(model.state_dict(), state)
    lay = {p: None for p, _ in expanded_layers(model)}
    inside, outside = _split_mismatch(model.state_dict(), state, lay)
    if problem and lay and outside is None:
        raise UsageError(
            f"the expanded layers' weights in {str(path)!r} do not fit the layout its header records "
            f"({inside}), although every other weight fits --arch {spec} {json.dumps(kwargs)}: the file is "
            "inconsistent (edited by hand or by another tool) or --arch-kwargs change the size of these layers; "
            "re-expand the compact model"
        )
    if problem:
        raise UsageError(
            f"the weights in {str(path)!r} do not fit --arch {spec} {json.dumps(kwargs)}: {problem}; "
            "check --arch and --arch-kwargs"
        )
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())  # keep float64 (or half) weights in their own precision
    model.load_state_dict(state, strict=True)
