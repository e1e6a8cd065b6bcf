"""Training objectives: cross-entropy, Hinton distillation and the product L2 penalty of expanded layers."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..rewrite import expanded_layers

__all__ = ["cross_entropy", "kd_loss", "product_l2", "split_decay_parameters"]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain objective, in float32 whatever the autocast dtype of ``logits``."""
    return F.cross_entropy(logits.float(), targets)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Hinton et al. (2015) distillation: ``alpha T^2 KL(p_T || q_T) + (1 - alpha) CE(q, y)``.

    ``p_T``/``q_T`` are the teacher's/student's softmax at temperature ``T``; the ``T^2`` keeps the soft
    term's gradients on the scale of the hard term's as ``T`` changes (the paper's KD setting uses this form).
    """
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits.float(), targets)
    return alpha * t * t * soft + (1 - alpha) * hard


def product_l2(model: nn.Module, weight_decay: float) -> torch.Tensor | None:
    """``wd/2 * (||W||^2 + ||b||^2)`` summed over the contracted ``(W, b)`` of every expanded layer
    (ExpandNets' "product L2"); ``None`` if the model has none.

    Its gradient is what SGD's ``weight_decay`` would add to the compact layer's parameters, so the
    expanded model is regularised exactly as the compact one would be with normal L2. The factors are
    left out of the optimizer's own decay (:func:`split_decay_parameters`).
    """
    total = None
    for _, layer in expanded_layers(model):
        weight, bias = layer.equivalent()
        term = weight.float().pow(2).sum()
        if bias is not None:
            term = term + bias.float().pow(2).sum()
        total = term if total is None else total + term
    return None if total is None else 0.5 * weight_decay * total


def split_decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(factor_params, other_params)``: the parameters inside expanded layers, and all the rest
    (each once, in ``model.parameters()`` order, so optimizer state lines up across runs)."""
    inside = {id(p) for _, layer in expanded_layers(model) for p in layer.parameters()}
    factors, others = [], []
    for p in model.parameters():
        (factors if id(p) in inside else others).append(p)
    return factors, others
