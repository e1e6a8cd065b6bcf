"""Subclasses of torch's layers: which ones can be expanded, and how they run on a composed kernel.

A subclass that computes ``f(x, T(W), b)`` from ``W = self.weight`` (weight standardisation, runtime
padding, fake quantisation) can be expanded as long as its forward reads the kernel through
``self.weight`` / ``self.bias``: the expanded layer composes the kernel and runs the subclass's own
forward on it ("fused only"). One that ignores ``self.weight`` cannot.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["fused_only_reason", "plain_forward_reason", "run_host", "qualname"]

#: Subclasses known to compute exactly what their base class computes (qualified class names).
#: ``timm.layers.Linear`` only casts the weight to the input's dtype for TorchScript.
KNOWN_PLAIN_SUBCLASSES = {"timm.layers.linear.Linear"}


def plain_forward_reason(module: nn.Module, base: type[nn.Module], methods: Sequence[str]) -> str | None:
    """``None`` if ``module`` can be expanded. Subclasses that change how the layer computes (weight
    standardisation, runtime padding, fake quantisation) can, as long as their forward reads the
    kernel through ``self.weight`` / ``self.bias``: they become fused-only layers."""
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False)):
        return "lazy module is not initialised yet; run one forward pass first"
    if _overridden(module, base, methods):
        return _host_reason(module)
    return None


#: For each base class, the methods whose override means "this subclass computes differently".
_OVERRIDABLE: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.Linear, ("forward",)),
    (nn.Conv1d, ("forward", "_conv_forward")),
    (nn.Conv2d, ("forward", "_conv_forward")),
    (nn.Conv3d, ("forward", "_conv_forward")),
)


def qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _overridden(module: nn.Module, base: type[nn.Module] | None = None, methods: Sequence[str] = ()) -> str | None:
    """The first method of torch's base class that ``module``'s class overrides, else ``None``."""
    if qualname(module) in KNOWN_PLAIN_SUBCLASSES:
        return None
    pairs = [(base, tuple(methods))] if base is not None else _OVERRIDABLE
    for b, names in pairs:
        if isinstance(module, b) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
            for name in names:
                if getattr(type(module), name) is not getattr(b, name):
                    return f"{name}() of torch's {b.__name__}"
    return None


def fused_only_reason(module: nn.Module) -> str | None:
    """Why an expansion of ``module`` can only run fused, or ``None``.

    A subclass computes ``f(x, T(W), b)`` with ``W = self.weight``: expanding ``W`` (compose the
    chain's kernel, then run the subclass's own forward on it) keeps ``T`` -- a weight
    standardisation, a runtime padding, a fake quantisation -- whatever it is. Running the factors
    one by one on the activations would skip ``T``, so the explicit mode is not available.
    """
    method = _overridden(module)
    if method is None:
        return None
    return f"fused only: {qualname(module)} overrides {method}, so its own forward runs on the composed kernel"


def _probe_input(module: nn.Module) -> torch.Tensor:
    """A small input that ``module`` accepts: big enough for the kernel, the padding and the stride."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return torch.randn(2, module.in_features, dtype=w.dtype, device=w.device)
    pads = module.padding if isinstance(module.padding, tuple) else (0,) * len(module.kernel_size)
    sizes = [d * (k - 1) + 1 + s + p for k, d, s, p in zip(module.kernel_size, module.dilation, module.stride, pads)]
    return torch.randn(1, module.in_channels, *sizes, dtype=w.dtype, device=w.device)


def run_host(host: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *args) -> torch.Tensor:
    """``host``'s own forward with ``weight`` and ``bias`` standing in for its parameters."""
    tensors = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return torch.func.functional_call(host, tensors, (x, *args), strict=False)


def _host_reason(module: nn.Module) -> str | None:
    """``None`` if ``module``'s own forward reads its kernel through ``self.weight`` (and its bias
    through ``self.bias``), else the reason it cannot be expanded.

    Probed on a copy (a quantiser's observer may update its state) with autograd: a parameter the
    forward does not read gets no gradient.
    """
    name = qualname(module)
    if getattr(module, "weight", None) is None:
        return f"{name} has no weight"
    probe = copy.deepcopy(module)
    tensors = {"weight": module.weight.detach().clone().requires_grad_()}
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().clone().requires_grad_()
    try:
        with torch.enable_grad():
            out = run_host(probe, _probe_input(module), tensors["weight"], tensors.get("bias"))
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                unread = list(tensors)
            else:
                grads = torch.autograd.grad(out.sum(), list(tensors.values()), allow_unused=True)
                unread = [n for n, g in zip(tensors, grads) if g is None]
    except Exception as e:  # a forward that needs a particular input: we cannot tell what it does
        return f"{name} overrides forward() and failed on a probe input ({type(e).__name__}: {e})"
    if unread:
        return (
            f"{name} overrides forward() and does not read self.{unread[0]}; "
            "expanding it would change nothing it computes"
        )
    return None
