"""Folding eval-mode BatchNorm into the convolution before it (``contract --fold-bn``).

The algebra is :func:`expandctl.algebra.fold_bn`; this module finds conv -> BN pairs in a module
tree and rewrites them, and rebuilds that structure when a folded checkpoint is loaded.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from .algebra import fold_bn
from .errors import UsageError
from .rewrite import expanded_layers, set_module

__all__ = ["fold_batchnorm", "fold_pairs", "apply_folds", "absorb_shifts", "add_biases"]


def fold_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv path, bn path)`` pairs where the BatchNorm is the only consumer of the conv's output.

    torch.fx finds them in any traceable model (ResNet's ``bn1(conv1(x))`` included); a model fx
    cannot trace falls back to consecutive children of ``nn.Sequential``. Layers used more than
    once (shared modules) are skipped: folding would change their other uses.
    """
    names = {id(m): n for n, m in model.named_modules()}
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1

    def foldable(conv, bn):
        return (
            type(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
            and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.track_running_stats
            and bn.running_mean is not None
            and bn.num_features == conv.out_channels
            and uses[id(conv)] == 1
            and uses[id(bn)] == 1
        )

    try:
        import torch.fx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # untraceable models (data-dependent control flow): Sequential fallback below
        graph = None
    pairs = []
    if graph is not None:
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in graph.nodes:
            if node.op != "call_module" or len(node.users) != 1:
                continue
            user = next(iter(node.users))
            if user.op != "call_module" or user.args[:1] != (node,) or len(user.args) != 1 or user.kwargs:
                continue
            if calls[node.target] != 1 or calls[user.target] != 1:
                continue
            conv, bn = model.get_submodule(node.target), model.get_submodule(user.target)
            if foldable(conv, bn):
                pairs.append((node.target, user.target))
        return pairs
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            children = list(seq)
            for conv, bn in zip(children, children[1:], strict=False):
                if foldable(conv, bn):
                    pairs.append((names[id(conv)], names[id(bn)]))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, list[dict[str, str]]]:
    """Fold every eval-mode BatchNorm that directly follows a conv into that conv.

    Returns the model (a copy unless ``inplace``) in eval mode and ``[{"conv", "bn"}]`` paths
    folded; each BatchNorm is replaced by ``nn.Identity`` (keep the list: ``expandctl.save``
    records it as ``folded_bn`` so the checkpoint can be rebuilt). The result is an inference model.
    """
    if expanded := [p for p, _ in expanded_layers(model)]:
        raise UsageError(f"contract the model before folding BatchNorm (expanded layers: {', '.join(expanded[:3])})")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    folded = []
    for conv_path, bn_path in fold_pairs(model):
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        if bn.running_mean is None or bn.running_var is None:
            raise UsageError(f"cannot fold {bn_path}: a BatchNorm without running statistics")
        w, b = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        conv.weight = nn.Parameter(w.to(conv.weight.dtype))
        conv.bias = nn.Parameter(b.to(conv.weight.dtype))
        set_module(model, bn_path, nn.Identity())
        folded.append({"conv": conv_path, "bn": bn_path})
    return model, folded


def apply_folds(model: nn.Module, folded: Sequence[Mapping[str, str]]) -> None:
    """Rebuild the structure :func:`fold_batchnorm` left (conv with bias, Identity for BN)."""
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
        set_module(model, pair["bn"], nn.Identity())


@torch.no_grad()
def absorb_shifts(model: nn.Module, conv_paths: Sequence[str]) -> list[str]:
    """Move the bias of each conv in ``conv_paths`` into the BatchNorm that alone consumes its output,
    and drop it: ``BN(y + t)`` is ``BN(y)`` with running mean ``mu - t`` (in train mode the batch
    mean absorbs ``t`` by itself). Contracted branch layers of a conv that had no bias get their
    folded shifts out of the way so: the compact model keeps its structure. Returns the paths that
    keep a bias (no BatchNorm follows them)."""
    pairs = dict(fold_pairs(model))
    kept = []
    for path in conv_paths:
        conv = model.get_submodule(path)
        bn_path = pairs.get(path)
        if conv.bias is None:
            continue
        if bn_path is None:
            kept.append(path)
            continue
        bn = model.get_submodule(bn_path)
        if bn.running_mean is not None:
            bn.running_mean.sub_(conv.bias.to(bn.running_mean.dtype))
        conv.bias = None
    return kept


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
