"""One pass over the data: a training epoch (with gradient accumulation) and validation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..errors import ExpandctlError
from ..layers import ComposeOnce
from ..rewrite import expanded_layers
from .callbacks import Callbacks
from .distill import training_loss
from .distributed import all_reduce_grads, no_sync
from .loaders import batches
from .losses import product_l2
from .state import Run

__all__ = ["TrainingDiverged", "train_epoch", "evaluate"]


class TrainingDiverged(ExpandctlError):
    """The loss became NaN or infinite; the last good checkpoint is kept (exit 1)."""

    exit_code = 1


def train_epoch(run: Run, loader: DataLoader, epoch: int, callbacks: Callbacks) -> tuple[float, float, int]:
    """One pass over the training shard: ``(mean loss, accuracy, images seen by all ranks)``.

    With ``accumulate`` N each optimizer step sums the gradients of N mini-batches (the objective
    is their mean loss; the last step of an epoch may have fewer); fused expanded layers then
    compose their kernels once per step (:class:`~expandctl.layers.ComposeOnce`).
    """
    config, d = run.config, run.dist
    run.net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    n = 0
    steps = len(loader)
    once = compose_once(run)
    try:
        for step, (x, y) in enumerate(batches(loader, run.device), start=1):
            size = min(config.accumulate, steps - (step - 1) // config.accumulate * config.accumulate)
            last = step % config.accumulate == 0 or step == steps
            # Plain accumulation lets DDP all-reduce on the step's last backward; with ComposeOnce the
            # factors get their gradients only after it, so every backward runs unsynchronised.
            sync = last and once is None
            if (step - 1) % config.accumulate == 0:
                run.optimizer.zero_grad(set_to_none=True)
                if once is not None:
                    once.__enter__()
            with no_sync(run.net, d, sync), run.autocast():
                logits = run.net(x)
                loss = training_loss(logits, x, y, run.teacher, config)
            value = loss.item()
            _check_loss(run, value, f"at epoch {epoch + 1}, step {step} of {steps}")
            with no_sync(run.net, d, sync):
                _objective(run, loss, size, once, last).backward()
            if last:
                _finish_step(run, once)
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            n += len(y)
            if d.main:
                callbacks.on_step(step, steps, value)
    finally:
        if once is not None:  # never leave held kernels behind (divergence, interrupt)
            once.__exit__(None, None, None)
    total_loss, total_correct, total_n = d.all_sum([loss_sum.item(), float(correct.item()), float(n)], run.device)
    return total_loss / max(total_n, 1), total_correct / max(total_n, 1), int(total_n)


def _check_loss(run: Run, value: float, where: str) -> None:
    """Raise :class:`TrainingDiverged` on every rank if the loss of any rank is not finite."""
    bad = 0.0 if math.isfinite(value) else 1.0
    if run.dist.active:  # every rank must stop at the same step, or the others hang in all-reduce
        bad = run.dist.all_sum([bad], run.device)[0]
    if bad:
        raise TrainingDiverged(f"the loss became {value} {where}")


def _objective(run: Run, loss: torch.Tensor, size: int, once: ComposeOnce | None, last: bool) -> torch.Tensor:
    """What one mini-batch backpropagates: its share of the step's mean loss, plus the product L2
    penalty (with ComposeOnce once per step, on the step's last mini-batch)."""
    config = run.config
    objective = loss if size == 1 else loss / size
    if config.decay_on == "product" and config.weight_decay > 0 and (once is None or last):
        penalty = product_l2(run.model, config.weight_decay)
        if penalty is not None:
            objective = objective + (penalty if once is not None or size == 1 else penalty / size)
    return objective


def _finish_step(run: Run, once: ComposeOnce | None) -> None:
    """The step's gradients complete (held kernels backpropagated, ranks averaged), then the optimizer step."""
    if once is not None:
        once.backward()
        once.__exit__(None, None, None)
        if run.dist.active:  # the micro-batches ran unsynchronised: average the summed gradients
            all_reduce_grads(run.model, run.dist.world_size)
    run.optimizer.step()


def compose_once(run: Run) -> ComposeOnce | None:
    """Gradient accumulation over fused expanded layers: compose their kernels once per step."""
    if run.config.accumulate == 1:
        return None
    layers = [layer for _, layer in expanded_layers(run.model) if layer.forward_mode == "fused"]
    return ComposeOnce(layers) if layers else None


@torch.no_grad()
def evaluate(run: Run, loader: DataLoader) -> tuple[float, float]:
    """Cross-entropy and accuracy on the validation set (each rank its shard, summed exactly)."""
    model, d = run.model, run.dist
    d.broadcast_buffers(model)  # after the last step other ranks' BN statistics drifted from rank 0's, which is saved
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in batches(loader, run.device):
        with run.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train()
    loss_sum, correct, n = d.all_sum([loss_sum, float(correct), float(n)], run.device)
    return loss_sum / max(n, 1), correct / max(n, 1)
