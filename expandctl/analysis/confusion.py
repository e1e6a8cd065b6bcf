"""Gradient confusion: how much the gradients of different mini-batches disagree.

Sankararaman et al. (ICML 2020) call SGD's gradients *confused* when mini-batch gradients point in
opposite directions (negative cosine similarity); ExpandNets (Guo et al., NeurIPS 2020, Fig. 2 and
Sec. 5) report that expanded networks keep the minimum pairwise cosine similarity higher during
training and its distribution more concentrated around zero.

The measure, for a model and a data split:

1. draw ``n`` random mini-batches of ``batch_size`` images, ``n`` the smallest with
   ``n (n - 1) / 2 >= pairs`` (15 batches for 100 pairs), disjoint when the split is large enough;
2. the gradient of each batch's mean loss with respect to the parameters, flattened into one vector
   (``wrt="trained"``: the parameters being trained, i.e. the factors of an expanded layer;
   ``wrt="compact"``: each expanded layer's composed weight and bias, the parameters of the
   contracted model, so that a compact and an expanded model are measured in the same space);
3. the cosine similarity of ``pairs`` distinct batch pairs drawn at random among the ``n (n-1)/2``.

Reusing each gradient in several pairs costs ``n`` backward passes instead of ``2 * pairs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import UsageError
from ..evaluate import read_batch, to_model
from ..rewrite import contract
from ._data import device_of, preserved, seed_rng

__all__ = ["gradient_confusion", "cosine_similarities", "batches_for", "grad_confusion_hook", "WRT", "MODES"]

#: ``trained``: w.r.t. the trained parameters (factors); ``compact``: w.r.t. the contracted weights.
WRT = ("trained", "compact")
#: ``train``: train-mode forward (BatchNorm batch statistics: the gradients SGD follows); ``eval``.
MODES = ("train", "eval")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batches_for(pairs: int) -> int:
    """The fewest batches ``n`` with ``n (n - 1) / 2 >= pairs``."""
    n = max(2, math.ceil((1 + math.sqrt(1 + 8 * pairs)) / 2) - 1)
    while n * (n - 1) // 2 < pairs:
        n += 1
    return n


def cosine_similarities(grads: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of rows ``grads[i]`` and ``grads[j]`` for each ``(i, j)`` row of ``pairs``,
    in float64. A zero gradient has no direction; its similarities are defined as 0."""
    g = grads.double()
    norms = g.norm(dim=1)
    a, b = pairs[:, 0], pairs[:, 1]
    dots = (g[a] * g[b]).sum(dim=1)
    denom = norms[a] * norms[b]
    return torch.where(denom > 0, dots / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(dots))


def _check(pairs: int, batch_size: int, n_data: int, wrt: str, mode: str) -> None:
    if pairs < 1:
        raise UsageError(f"the number of pairs must be at least 1 (got {pairs})")
    if batch_size < 1:
        raise UsageError(f"the batch size must be at least 1 (got {batch_size})")
    if batch_size > n_data:
        raise UsageError(f"the batch size ({batch_size}) is larger than the data split ({n_data} images)")
    if wrt not in WRT:
        raise UsageError(f"wrt must be one of {', '.join(WRT)} (got {wrt!r})")
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")


def _draw(n_data: int, n_batches: int, batch_size: int, pairs: int, g: torch.Generator):
    """Batch index lists, disjoint when the data allows it, and ``pairs`` distinct batch pairs."""
    if n_batches * batch_size <= n_data:
        batches = torch.randperm(n_data, generator=g)[: n_batches * batch_size].view(n_batches, batch_size)
    else:  # a small split: each batch is drawn on its own, batches may share images
        batches = torch.stack([torch.randperm(n_data, generator=g)[:batch_size] for _ in range(n_batches)])
    every = torch.combinations(torch.arange(n_batches), r=2)
    chosen = torch.randperm(len(every), generator=g)[:pairs].sort().values
    return batches, every[chosen]


def gradient_confusion(
    model: nn.Module,
    dataset: Dataset,
    *,
    pairs: int = 100,
    batch_size: int = 128,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    wrt: str = "trained",
    mode: str = "train",
) -> dict:
    """Pairwise cosine similarities of mini-batch gradients of ``model`` on ``dataset``.

    Returns ``{"min", "mean", "std", "similarities" (list, one per pair), "pairs", "batches",
    "batch_size", "wrt", "mode", "params"}`` (``params``: the length of the gradient vectors).

    ``loss_fn(logits, targets)`` is the mean loss of a batch (cross-entropy by default). ``mode``
    is the forward's mode: ``"train"`` (default) measures the gradients SGD follows, BatchNorm with
    batch statistics. Nothing of ``model`` changes: the gradients come from ``torch.autograd.grad``
    (``.grad`` is untouched), and BatchNorm statistics, train/eval flags and the global torch RNG
    (dropout) are restored afterwards; the batches are drawn from a generator seeded by ``seed``.
    """
    _check(pairs, batch_size, len(dataset), wrt, mode)
    loss_fn = loss_fn or F.cross_entropy
    net = contract(model) if wrt == "compact" else model  # contract() works on a copy
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the model has no trainable parameters (every requires_grad is False)")
    device = device_of(net)
    g = torch.Generator().manual_seed(seed)
    n_batches = batches_for(pairs)
    batches, chosen = _draw(len(dataset), n_batches, batch_size, pairs, g)
    size = sum(p.numel() for p in params)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    grads = torch.empty(n_batches, size, dtype=dtype, device=device)
    with preserved(net):
        seed_rng(seed, device)
        net.train(mode == "train")
        for k, idx in enumerate(batches.tolist()):
            x, y = to_model(net, *read_batch(dataset, idx))
            with torch.enable_grad():
                loss = loss_fn(net(x).float(), y)
                got = torch.autograd.grad(loss, params, allow_unused=True)
            grads[k] = torch.cat(
                [(gr if gr is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for gr, p in zip(got, params)]
            )
    sims = cosine_similarities(grads, chosen.to(device)).cpu()
    return {
        "min": float(sims.min()),
        "mean": float(sims.mean()),
        "std": float(sims.std(unbiased=False)),
        "similarities": sims.tolist(),
        "pairs": int(len(sims)),
        "batches": n_batches,
        "batch_size": batch_size,
        "wrt": wrt,
        "mode": mode,
        "params": size,
    }


def grad_confusion_hook(pairs: int = 100, batch_size: int = 128, seed: int = 0, wrt: str = "trained"):
    """An epoch hook for :func:`expandctl.train.loop.train`: ``grad_confusion_min`` and
    ``grad_confusion_mean`` on the training set after every epoch (the paper's Fig. 2, middle).

    Epoch ``e`` draws its batches with seed ``(seed, e)``, from its own generator: the training's
    random streams, weights and BatchNorm statistics are left exactly as they were, so a run with the
    hook reaches the same weights as one without. Only rank 0 measures (the others add nothing).
    """

    def hook(ctx) -> dict | None:
        if ctx.rank != 0:
            return None
        result = gradient_confusion(
            ctx.model,
            ctx.train_data,
            pairs=pairs,
            batch_size=min(batch_size, len(ctx.train_data)),
            seed=seed * 1_000_003 + ctx.epoch,
            loss_fn=ctx.loss_fn,
            wrt=wrt,
        )
        return {"grad_confusion_min": result["min"], "grad_confusion_mean": result["mean"]}

    return hook
