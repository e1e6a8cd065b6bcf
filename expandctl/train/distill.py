"""Distillation: the teacher (loaded, contracted, frozen) and the loss it gives the student."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..checkpoint import load_checkpoint
from ..rewrite import contract
from .losses import cross_entropy, kd_loss
from .options import TrainConfig
from .state import check_finite

__all__ = ["load_teacher", "training_loss"]


def load_teacher(config: TrainConfig, device: torch.device, module: nn.Module | None = None) -> nn.Module | None:
    """The teacher in eval mode on ``device``: ``module`` if given, else ``config.teacher`` loaded and
    contracted with frozen parameters; ``None`` without distillation."""
    if module is not None:
        return module.to(device).eval()
    if not config.teacher:
        return None
    ckpt = load_checkpoint(config.teacher, config.teacher_arch, config.teacher_arch_kwargs, config.trust_pickle)
    check_finite(ckpt.model, f"teacher {config.teacher}", option="teacher")
    teacher = contract(ckpt.model, inplace=True)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def training_loss(
    logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, teacher: nn.Module | None, config: TrainConfig
) -> torch.Tensor:
    """Cross-entropy, or with a teacher Hinton's distillation loss against its logits on ``x``."""
    if teacher is None:
        return cross_entropy(logits, y)
    with torch.no_grad():
        teacher_logits = teacher(x)
    return kd_loss(logits, teacher_logits, y, config.kd_alpha, config.kd_temperature)
