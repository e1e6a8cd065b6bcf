"""Loss landscapes along filter-normalised random directions (Li et al., NeurIPS 2018).

Around trained weights ``theta``, the loss and error of ``theta + a * d1`` (1D) or
``theta + a * d1 + b * d2`` (2D), for ``a, b`` on a grid ``[-span, span]``. Each direction is
Gaussian noise rescaled *per filter*: filter ``i`` of a weight (``W[i]``, the output channel of a
convolution, the row of a linear layer) gets direction ``d[i] / ||d[i]|| * ||W[i]||``, so the plot
does not depend on the scale invariance that BatchNorm gives a filter. One-dimensional parameters
(biases, BatchNorm weights) get a zero direction ("ignore biasbn" in Li et al.'s code); buffers
(BatchNorm running statistics) are left as they are. The model is evaluated in eval mode.

Which parameters: ``space="compact"`` (default) perturbs the *contracted* model, i.e. the function
an expanded network computes, written in the compact parameterisation. That is the space in which a
compact and an expanded model of the same architecture can be compared (same filters, same number of
directions, the same normalisation), which is what the ExpandNets claim is about: training through
the expansion lands in a flatter region of the *compact* model's landscape. ``space="factors"``
perturbs every factor of the chains instead (the landscape the optimiser walks on); there the
product of several perturbed factors moves the function by terms of order ``a**2``, ``a**3``..., so
its curves are not comparable with a compact model's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..errors import UsageError
from ..evaluate import evaluate_torch
from ..rewrite import contract

__all__ = ["filter_normalized_direction", "evaluate", "grid", "loss_landscape", "SPACES"]

#: ``compact``: perturb the contracted model (default); ``factors``: perturb the trained factors.
SPACES = ("compact", "factors")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def filter_normalized_direction(params: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """A random direction shaped like ``params``: per filter (index along dim 0) the norm of the
    weight's filter; zero for parameters with fewer than two dimensions. Drawn on the CPU from
    ``generator`` (the same direction on any device), returned on each parameter's device."""
    out = []
    for p in params:
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        w = p.detach().double().cpu()
        scale = w.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-10)  # Li et al.'s epsilon
        d = d * scale.view(-1, *([1] * (p.dim() - 1)))
        out.append(d.to(device=p.device, dtype=p.dtype))
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    max_batches: int | None = None,
    loss_fn: LossFn | None = None,
) -> dict:
    """Eval-mode ``{"loss", "error", "samples"}`` of ``model`` on the first ``max_batches``
    batches of ``dataset`` (all by default), in order (:func:`expandctl.evaluate.evaluate_torch`)."""
    r = evaluate_torch(model, dataset, batch_size, max_batches, loss_fn)
    return {"loss": r["loss"], "error": r["error"], "samples": r["samples"]}


def grid(steps: int, span: float) -> list[float]:
    """``steps`` evenly spaced values from ``-span`` to ``span``; an odd ``steps`` has exactly 0.0
    in the middle (``2 i / (steps - 1)`` is exactly 1 there), so the centre is the trained weights."""
    if steps == 1:
        return [0.0]
    return [span * (2 * i / (steps - 1) - 1) for i in range(steps)]


def _check(dims, steps, span, max_batches, batch_size, space) -> None:
    if dims not in (1, 2):
        raise UsageError(f"dims must be 1 or 2 (got {dims})")
    if steps < 1:
        raise UsageError(f"steps must be at least 1 (got {steps})")
    if not (span > 0 and span < float("inf")):
        raise UsageError(f"span must be a positive number (got {span})")
    if max_batches is not None and max_batches < 1:
        raise UsageError(f"max_batches must be at least 1 (got {max_batches})")
    if batch_size < 1:
        raise UsageError(f"the batch size must be at least 1 (got {batch_size})")
    if space not in SPACES:
        raise UsageError(f"space must be one of {', '.join(SPACES)} (got {space!r})")


def loss_landscape(
    model: nn.Module,
    dataset: Dataset,
    *,
    dims: int = 1,
    steps: int = 21,
    span: float = 1.0,
    seed: int = 0,
    max_batches: int | None = None,
    batch_size: int = 256,
    space: str = "compact",
    loss_fn: LossFn | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Loss and error of ``model`` along ``dims`` filter-normalised random directions.

    Returns ``{"dims", "alphas", "loss", "error", "loss_at_0", "error_at_0", "samples", "space",
    "steps", "span", "seed"}``; in 2D also ``"betas"``, and ``loss[i][j]`` / ``error[i][j]`` are
    at ``(alphas[i], betas[j])``. ``loss_at_0`` is the evaluation of the unperturbed weights, the
    same number :func:`evaluate` gives for the (contracted) model. ``model`` is not modified: the
    perturbations are applied to a copy. ``progress(done, total)`` is called after each evaluation.
    """
    _check(dims, steps, span, max_batches, batch_size, space)
    net = contract(model) if space == "compact" else copy.deepcopy(model)
    params = list(net.parameters())
    gen = torch.Generator().manual_seed(seed)
    directions = [filter_normalized_direction(params, gen) for _ in range(dims)]
    origin = [p.detach().clone() for p in params]

    def at(coefs: Sequence[float]) -> dict:
        with torch.no_grad():
            for k, (p, o) in enumerate(zip(params, origin)):
                value = o.clone()
                for c, d in zip(coefs, directions):
                    if c != 0.0:
                        value.add_(d[k], alpha=c)
                p.copy_(value)
        return evaluate(net, dataset, batch_size=batch_size, max_batches=max_batches, loss_fn=loss_fn)

    axis = grid(steps, span)
    total, done = 1 + steps**dims, 0

    def tick(result: dict) -> dict:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)
        return result

    centre = tick(at([0.0] * dims))
    if dims == 1:
        points = [tick(at([a])) for a in axis]
        loss = [r["loss"] for r in points]
        error = [r["error"] for r in points]
    else:
        points2 = [[tick(at([a, b])) for b in axis] for a in axis]
        loss = [[r["loss"] for r in row] for row in points2]
        error = [[r["error"] for r in row] for row in points2]
    result = {
        "dims": dims,
        "alphas": axis,
        "loss": loss,
        "error": error,
        "loss_at_0": centre["loss"],
        "error_at_0": centre["error"],
        "samples": centre["samples"],
        "space": space,
        "steps": steps,
        "span": span,
        "seed": seed,
    }
    if dims == 2:
        result["betas"] = list(axis)
    return result
