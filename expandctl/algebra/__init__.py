"""Pure tensor algebra: composing linear layers into one layer. Nothing here touches an ``nn.Module``.

Kernels are in PyTorch's convolution layout ``(out, in / groups, *taps)``; a ``nn.Linear`` weight
``(out, in)`` is the same thing with no spatial dimensions and ``groups=1``.

* :mod:`.chain` -- serial chains (ExpandNets): compose factors, BatchNorm folding, CK kernel steps;
* :mod:`.toom` -- the faster Toom-Cook composition used while training;
* :mod:`.branch` -- parallel branches (ACNet, RepVGG, DBB, OREPA): embedded, identity and average
  kernels, per-channel affines, sums;
* :mod:`.fit` -- the least-squares fit of a CK chain to one kernel (``init="preserve"``).
"""

from .branch import (
    apply_affine,
    average_after,
    average_kernel,
    bn_affine,
    centre_offset,
    embed_kernel,
    identity_kernel,
    identity_tap,
    sum_branches,
)
from .chain import (
    chain_order,
    compose_bias,
    compose_chain,
    compose_pair,
    compose_transposed_chain,
    composition_cost,
    flip_transpose,
    fold_bn,
    hidden_width,
    kernel_steps,
)
from .toom import (
    COMPOSE_METHODS,
    TOOM_MAX_TAPS,
    TOOM_MIN_GAIN,
    TOOM_MIN_MACS,
    compose_chain_fast,
    compose_toom,
    composition_method,
    toom_cost,
    toom_order,
)

__all__ = [
    "compose_pair",
    "compose_bias",
    "compose_chain",
    "compose_chain_fast",
    "compose_toom",
    "composition_method",
    "compose_transposed_chain",
    "chain_order",
    "composition_cost",
    "kernel_steps",
    "flip_transpose",
    "hidden_width",
    "fold_bn",
    "toom_order",
    "toom_cost",
    "COMPOSE_METHODS",
    "TOOM_MAX_TAPS",
    "TOOM_MIN_MACS",
    "TOOM_MIN_GAIN",
    "embed_kernel",
    "centre_offset",
    "identity_tap",
    "identity_kernel",
    "average_kernel",
    "average_after",
    "bn_affine",
    "apply_affine",
    "sum_branches",
]
