"""Folding eval-mode BatchNorm into the convolution before it (``contract --fold-bn``).

The algebra is :func:`expandctl.algebra.fold_bn`; this module finds conv -> BN pairs in a module
tree and rewrites them (a folded checkpoint records the pairs; :mod:`expandctl.checkpoint.rebuild`
rebuilds that structure when it is loaded).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

from .algebra import fold_bn
from .errors import UsageError
from .graph.trace import Untraceable, trace
from .layers.tree import expanded_layers, set_module

__all__ = ["fold_batchnorm", "fold_pairs", "absorb_shifts"]


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = trace(model)[0].graph
    except Untraceable:  # data-dependent control flow at the top: Sequential fallback below
        graph = None
    pairs = []
    if graph is not None:
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
            elif node.op == "get_attr" and node.target.endswith(".running_mean"):
                owner = node.target.rsplit(".", 1)[0]
                calls[owner] = calls.get(owner, 0) + 1
        for node in graph.nodes:
            users = [u for u in node.users if not _reads_rank(u)]
            if node.op != "call_module" or len(users) != 1:
                continue
            bn_path = _batchnorm_of(users[0], node)
            if bn_path is None or calls.get(node.target) != 1 or calls.get(bn_path) != 1:
                continue
            conv, bn = model.get_submodule(node.target), model.get_submodule(bn_path)
            if foldable(conv, bn):
                pairs.append((node.target, bn_path))
        return pairs
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            children = list(seq)
            for conv, bn in zip(children, children[1:], strict=False):
                if foldable(conv, bn):
                    pairs.append((names[id(conv)], names[id(bn)]))
    return pairs


def _reads_rank(user) -> bool:
    """A node that reads only a tensor's rank (timm's ``assert x.ndim == 4`` before its BatchNorm)."""
    return user.op == "call_function" and user.target is getattr and user.args[1:] == ("ndim",)


def _batchnorm_of(user, node) -> str | None:
    """The BatchNorm module path that ``user`` applies to ``node``: a call of the module itself, or
    ``F.batch_norm`` on its running statistics (a subclass traced through, e.g. timm's BatchNormAct2d)."""
    if user.op == "call_module" and user.args == (node,) and not user.kwargs:
        return user.target
    if user.op == "call_function" and user.target is torch.nn.functional.batch_norm and user.args[:1] == (node,):
        stats = [a for a in (*user.args[1:3], user.kwargs.get("running_mean"), user.kwargs.get("running_var")) if a]
        owners = {a.target.rsplit(".", 1)[0] for a in stats if getattr(a, "op", None) == "get_attr"}
        if len(stats) == 2 and len(owners) == 1 and user.kwargs.get("training", False) is False:
            return owners.pop()
    return None


def _plain_batchnorm(bn: nn.Module) -> bool:
    return type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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
        if not _plain_batchnorm(bn) and bn.weight is None:
            continue  # a subclass (activation inside) without an affine to neutralise: left as it is
        w, b = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        conv.weight = nn.Parameter(w.to(conv.weight.dtype))
        conv.bias = nn.Parameter(b.to(conv.weight.dtype))
        if _plain_batchnorm(bn):
            set_module(model, bn_path, nn.Identity())
            folded.append({"conv": conv_path, "bn": bn_path})
        else:
            # timm's BatchNormAct2d and the like keep their activation: the BatchNorm becomes x -> x
            # (mean 0, weight sqrt(var + eps), bias 0) and stays, so the structure is the same.
            bn.weight.copy_(torch.sqrt(bn.running_var + bn.eps).to(bn.weight.dtype))
            bn.bias.zero_()
            bn.running_mean.zero_()
            folded.append({"conv": conv_path, "bn": bn_path, "neutral": True})
    return model, folded


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
