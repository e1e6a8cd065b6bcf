"""Expanded layers: a chain of linear factors standing in for one ``nn.Linear`` / ``nn.ConvNd``.

Every kind has the same two verbs:

* :meth:`ExpandedLayer.equivalent` -- the chain's ``(weight, bias)``, differentiable in the factors;
* :meth:`ExpandedLayer.contract` -- a module of the original class and attributes holding them.

and two forward modes with the same function: ``"explicit"`` runs the factors one after the other
on the activations (the paper's code), ``"fused"`` (default) composes the kernel and runs a single
layer, so training costs close to the compact layer (OREPA-style online re-parameterisation).

Exactness rules (PAPER.md): padding is applied once, to the input, with the original mode and amount;
later factors pad nothing. The stride sits on the k x k factor (CL) or the last factor (CK); every
spatial factor keeps the dilation; every factor keeps ``groups`` and has a bias iff the original has.
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import algebra
from .errors import PreserveFitError, UsageError

__all__ = [
    "ExpandedLayer",
    "ExpandedLinear",
    "ExpandedConv",
    "ExpandedConvCL",
    "ExpandedConvCK",
    "ExpandedConvTranspose",
    "ExpandedConvTransposeCL",
    "ExpandedConvTransposeCK",
    "TRANSPOSED_EXPANSIONS",
    "expansion_for",
    "FORWARD_MODES",
    "INIT_MODES",
    "EXPANSIONS",
    "register_expansion",
    "ComposeOnce",
]

FORWARD_MODES = ("fused", "explicit")
INIT_MODES = ("scratch", "preserve")
CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

#: Relative residual above which a CK ``preserve`` fit counts as failed, by factor dtype. Exact
#: fits land at 1e-15..5e-11 in float64 and, after rounding to float32, up to ~2e-5 (depthwise 9x9);
#: fits that fail stay above 1e-2.
PRESERVE_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def _template_of(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its ``weight`` and ``bias``: same class, attributes and hooks.

    Pre-seeding deepcopy's memo maps those two parameters to ``None``, so they are not copied. Any
    other state (a subclass's gain, a quantiser's scale) is copied: a subclass layer runs its own
    forward on the composed kernel and needs it (see :func:`fused_only_reason`).
    """
    memo = {id(p): None for name, p in module._parameters.items() if name in ("weight", "bias") and p is not None}
    return copy.deepcopy(module, memo)


def _orthonormal(rows: int, cols: int, groups: int, like: torch.Tensor) -> torch.Tensor:
    """``groups`` random blocks of shape ``(rows, cols)`` with orthonormal columns (rows >= cols)
    or rows (rows < cols), stacked along dim 0: ``(groups * rows, cols)``."""
    g = torch.randn(groups, max(rows, cols), min(rows, cols), dtype=torch.float64)
    q, _ = torch.linalg.qr(g)
    if rows < cols:
        q = q.transpose(1, 2)
    return q.reshape(groups * rows, cols).to(like)


#: Hyper-parameters of the replaced layer that an expanded layer answers for it (read-only).
TEMPLATE_ATTRIBUTES = frozenset(
    {
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "output_padding",
        "padding_mode",
        "transposed",
        "in_features",
        "out_features",
    }
)


class ExpandedLayer(nn.Module):
    """Base class: ``factors`` (an ``nn.ModuleList``) applied first to last."""

    kind: ClassVar[str] = ""
    #: Why the explicit chain cannot run this layer (a subclass with its own forward), else ``None``.
    fused_only: str | None = None
    #: Higher runs first when several kinds accept the same layer (ck before cl).
    priority: ClassVar[int] = 0
    source_types: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __init__(self, template: nn.Module, factors: Sequence[nn.Module], groups: int, forward: str):
        super().__init__()
        # Stored outside the module tree: the template must not show up in state_dict/modules().
        object.__setattr__(self, "_template", template)
        self.factors = nn.ModuleList(factors)
        self.groups = groups
        self.forward_mode = forward
        self.fit_residual: float | None = None
        #: How training composes the kernel (algebra.COMPOSE_METHODS); contraction is always direct.
        self.composition = "auto"
        self._order = algebra.chain_order(tuple(tuple(f.weight.shape) for f in self.factors))
        self._cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        #: Set by :class:`ComposeOnce`: the composed kernel as leaves, shared by several forwards.
        self._held: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.fused_only = fused_only_reason(template)
        if self.fused_only is not None:
            # Registered, so that the subclass's own state (a gain, a quantiser's scale) trains,
            # moves and saves with the factors; its weight and bias are the composed ones.
            self.host = template

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def accepts(cls, module: nn.Module, pointwise: bool = False) -> str | None:
        """``None`` if this kind can expand ``module``, else the reason it cannot."""
        raise NotImplementedError

    @classmethod
    def hidden_for(cls, module: nn.Module, rate: float) -> list[int]:
        """Hidden widths of the chain at expansion rate ``rate``."""
        raise NotImplementedError

    @classmethod
    def from_module(
        cls, module: nn.Module, hidden: Sequence[int], init: str = "scratch", forward: str = "fused"
    ) -> ExpandedLayer:
        raise NotImplementedError

    # --- the two verbs ------------------------------------------------------------------------
    def equivalent(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chain's single ``(weight, bias)``; differentiable in the factors.

        Without autograd (evaluation, export, contraction) the result is cached until a factor
        changes (tracked by tensor version counters), so validation loops compose once.
        """
        if self._held is not None and torch.is_grad_enabled():
            return self._held
        weights = [f.weight for f in self.factors]
        biases = [f.bias for f in self.factors] if any(f.bias is not None for f in self.factors) else None
        grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
        if not grad:
            key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in self.parameters())
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        # Composition runs at the factors' precision even under autocast: rounding the product of
        # a chain in bf16 loses far more than rounding the one convolution that follows.
        with torch.autocast(weights[0].device.type, enabled=False):
            result = self._compose(weights, biases, fast=grad)
        self._cache = None if grad else (key, result)
        return result

    def _compose(self, weights, biases, fast: bool = False):
        """The chain's ``(weight, bias)``; ``fast`` (training) may use the faster composition, a few
        1e-6 off in float32; contraction and every check use the exact direct algebra."""
        if fast:
            return algebra.compose_chain_fast(weights, biases, self.groups, self._order, self.composition)
        return algebra.compose_chain(weights, biases, self.groups, self._order)

    @torch.no_grad()
    def contract(self) -> nn.Module:
        """A module of the original class and attributes computing exactly this chain."""
        weight, bias = self.equivalent()
        layer = copy.deepcopy(self._template)
        # Contiguous: a composed kernel can come out with permuted strides, which torch would keep
        # (clone preserves them) and the ONNX exporter would record as extra Gather/Reshape nodes.
        layer.weight = nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(memory_format=torch.contiguous_format))
        return layer.train(self.training)

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_only is not None:
            return _run_host(self.host, x, *self.equivalent())
        if self.forward_mode == "fused":
            weight, bias = self.equivalent()
            return self._single(x, weight, bias)
        return self._chain(x)

    def _single(self, x, weight, bias):
        raise NotImplementedError

    def _chain(self, x):
        for f in self.factors:
            x = f(x)
        return x

    def linear_part(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(one layer with the composed kernel, the chain run on x)``, both without any subclass
        transform: the algebra a fused-only layer rests on, for the contraction check."""
        weight, bias = self.equivalent()
        return self._single(x, weight, bias), self._chain(x)

    def __getattr__(self, name: str):
        # Model code reads the replaced layer's hyper-parameters off it (timm's DaViT pads by
        # ``self.conv.kernel_size``): they stay readable on the expanded layer, from the template.
        if name in TEMPLATE_ATTRIBUTES:
            template = self.__dict__.get("_template")
            if template is not None and hasattr(template, name):
                return getattr(template, name)
        return super().__getattr__(name)

    @property
    def weight(self) -> torch.Tensor:
        """Composed weight, for code that reads ``layer.weight`` directly (e.g. attention)."""
        return self.equivalent()[0]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.equivalent()[1]

    def set_forward(self, mode: str) -> None:
        if mode not in FORWARD_MODES:
            raise UsageError(f"unknown forward mode {mode!r}; use one of {', '.join(FORWARD_MODES)}")
        self.forward_mode = mode

    def config(self) -> dict:
        """What is needed to rebuild this layer's structure from the original layer."""
        # Output widths by name: a transposed factor's weight is (in, out / groups, ...), so its
        # shape[0] is the input width.
        widths = [getattr(f, "out_channels", None) or f.out_features for f in self.factors[:-1]]
        return {"kind": self.kind, "hidden": widths}

    def __getstate__(self):
        # The no-grad cache is derived data tied to this instance's tensors; never pickle it.
        state = self.__dict__.copy()
        state["_cache"] = state["_held"] = None
        return state

    def __setstate__(self, state):
        # Layers pickled before these attributes existed (trusted pickle checkpoints).
        state.setdefault("_held", None)
        state.setdefault("composition", "auto")
        super().__setstate__(state)


class ComposeOnce:
    """Compose each fused layer's kernel once for several forward passes (gradient accumulation).

    Inside the block every layer's :meth:`~ExpandedLayer.equivalent` (with autograd on) returns the
    same composed ``(weight, bias)`` as leaf tensors, whose gradients accumulate over the passes;
    :meth:`backward` then sends the sum through the compositions once. By linearity of the
    gradient, the factors get the sum of the per-pass gradients, at one composition per step::

        with ComposeOnce(layers) as once:
            for x, y in micro_batches:
                (loss_fn(model(x), y) / n).backward()
            once.backward()
    """

    def __init__(self, layers: Sequence[ExpandedLayer]):
        self.layers = [layer for layer in layers if layer.forward_mode == "fused"]
        self._pending: list[tuple[tuple, tuple]] = []

    def __enter__(self) -> ComposeOnce:
        for layer in self.layers:
            composed = layer.equivalent()
            leaves = tuple(None if t is None else t.detach().requires_grad_(t.requires_grad) for t in composed)
            layer._held = leaves
            self._pending.append((composed, leaves))
        return self

    def backward(self) -> None:
        """Backpropagate the leaves' accumulated gradients through the compositions (once)."""
        outputs, grads = [], []
        for composed, leaves in self._pending:
            for out, leaf in zip(composed, leaves):
                if leaf is not None and leaf.grad is not None:
                    outputs.append(out)
                    grads.append(leaf.grad)
        self._pending = []
        if outputs:
            torch.autograd.backward(outputs, grads)

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer._held = None
        self._pending = []


EXPANSIONS: dict[str, type[ExpandedLayer]] = {}


def register_expansion(cls: type[ExpandedLayer]) -> type[ExpandedLayer]:
    """Class decorator adding an expansion kind to the registry; duplicate names are refused."""
    if not cls.kind or cls.kind in EXPANSIONS:
        raise ValueError(f"expansion kind {cls.kind!r} is empty or already registered")
    EXPANSIONS[cls.kind] = cls
    return cls


#: Subclasses known to compute exactly what their base class computes (qualified class names).
#: ``timm.layers.Linear`` only casts the weight to the input's dtype for TorchScript.
KNOWN_PLAIN_SUBCLASSES = {"timm.layers.linear.Linear"}


def _plain_forward_reason(module: nn.Module, base: type[nn.Module], methods: Sequence[str]) -> str | None:
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


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _overridden(module: nn.Module, base: type[nn.Module] | None = None, methods: Sequence[str] = ()) -> str | None:
    """The first method of torch's base class that ``module``'s class overrides, else ``None``."""
    if _qualname(module) in KNOWN_PLAIN_SUBCLASSES:
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
    return f"fused only: {_qualname(module)} overrides {method}, so its own forward runs on the composed kernel"


def _probe_input(module: nn.Module) -> torch.Tensor:
    """A small input that ``module`` accepts: big enough for the kernel, the padding and the stride."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return torch.randn(2, module.in_features, dtype=w.dtype, device=w.device)
    pads = module.padding if isinstance(module.padding, tuple) else (0,) * len(module.kernel_size)
    sizes = [d * (k - 1) + 1 + s + p for k, d, s, p in zip(module.kernel_size, module.dilation, module.stride, pads)]
    return torch.randn(1, module.in_channels, *sizes, dtype=w.dtype, device=w.device)


def _run_host(host: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *args) -> torch.Tensor:
    """``host``'s own forward with ``weight`` and ``bias`` standing in for its parameters."""
    tensors = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return torch.func.functional_call(host, tensors, (x, *args), strict=False)


def _host_reason(module: nn.Module) -> str | None:
    """``None`` if ``module``'s own forward reads its kernel through ``self.weight`` (and its bias
    through ``self.bias``), else the reason it cannot be expanded.

    Probed on a copy (a quantiser's observer may update its state) with autograd: a parameter the
    forward does not read gets no gradient.
    """
    name = _qualname(module)
    if getattr(module, "weight", None) is None:
        return f"{name} has no weight"
    probe = copy.deepcopy(module)
    tensors = {"weight": module.weight.detach().clone().requires_grad_()}
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().clone().requires_grad_()
    try:
        with torch.enable_grad():
            out = _run_host(probe, _probe_input(module), tensors["weight"], tensors.get("bias"))
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


# --------------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------------
@register_expansion
class ExpandedLinear(ExpandedLayer):
    """FC expansion: ``Linear(m, n)`` -> ``Linear(m, h1)``, ``Linear(h1, h2)``, ``Linear(h2, n)``,
    with ``h1 = ceil(r m)``, ``h2 = ceil(r n)``; ``W = W3 W2 W1``, ``b = W3 (W2 b1 + b2) + b3``."""

    kind = "fc"
    source_types = (nn.Linear,)

    @classmethod
    def accepts(cls, module, pointwise=False):
        if not isinstance(module, nn.Linear):
            return f"{type(module).__name__} is not a Linear layer"
        return _plain_forward_reason(module, nn.Linear, ("forward",))

    @classmethod
    def hidden_for(cls, module, rate):
        return [algebra.hidden_width(module.in_features, rate), algebra.hidden_width(module.out_features, rate)]

    @classmethod
    def from_module(cls, module, hidden, init="scratch", forward="fused"):
        _check_modes(init, forward)
        widths = [module.in_features, *hidden, module.out_features]
        has_bias = module.bias is not None
        kw = {"device": module.weight.device, "dtype": module.weight.dtype}
        factors = [nn.Linear(a, b, bias=has_bias, **kw) for a, b in zip(widths[:-1], widths[1:])]
        layer = cls(_template_of(module), factors, 1, forward)
        if init == "preserve":
            _preserve_exact(layer, module.weight, module.bias)
        return layer.train(module.training)

    def _single(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def extra_repr(self):
        widths = [self.factors[0].in_features] + [f.out_features for f in self.factors]
        return f"fc {' -> '.join(map(str, widths))}, forward={self.forward_mode}"


# --------------------------------------------------------------------------------------------------
# Convolutions
# --------------------------------------------------------------------------------------------------
def input_padding(conv: nn.modules.conv._ConvNd) -> list[int]:
    """Amounts for ``F.pad`` (last dim first, left/right) that the original conv applies to its input."""
    dims = len(conv.kernel_size)
    if conv.padding == "valid":
        return [0] * (2 * dims)
    if conv.padding == "same":
        pads: list[int] = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]  # torch puts the odd extra on the right
        return pads
    return [p for p in reversed(conv.padding) for _ in range(2)]


class ExpandedConv(ExpandedLayer):
    """Shared machinery of CL and CK: a chain of ``ConvNd`` factors, padding applied once to the input."""

    source_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def __init__(self, template, factors, groups, forward):
        super().__init__(template, factors, groups, forward)
        t = template
        self.padding = t.padding
        self.padding_mode = t.padding_mode
        self.stride = t.stride
        self.dilation = t.dilation
        self._pad = input_padding(t)

    @classmethod
    def accepts(cls, module, pointwise=False):
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return "a transposed convolution: ExpandedConvTransposeCL / CK expand it (see expansion_for)"
        if not isinstance(module, cls.source_types):
            return f"{type(module).__name__} is not a Conv1d/2d/3d"
        return _plain_forward_reason(module, _conv_base(module), ("forward", "_conv_forward"))

    @classmethod
    def _factor_specs(cls, module, hidden) -> list[dict]:
        """Per factor: out channels, kernel size, stride, dilation."""
        raise NotImplementedError

    @classmethod
    def from_module(cls, module, hidden, init="scratch", forward="fused"):
        _check_modes(init, forward)
        dims = len(module.kernel_size)
        conv_t = CONV_TYPES[dims]
        has_bias = module.bias is not None
        kw = {"device": module.weight.device, "dtype": module.weight.dtype}
        factors, c_in = [], module.in_channels
        for spec in cls._factor_specs(module, hidden):
            dilation = tuple(d if k > 1 else 1 for d, k in zip(module.dilation, spec["kernel_size"]))
            factors.append(
                conv_t(
                    c_in,
                    spec["out"],
                    spec["kernel_size"],
                    stride=spec["stride"],
                    padding=0,
                    dilation=dilation,
                    groups=module.groups,
                    bias=has_bias,
                    **kw,
                )
            )
            c_in = spec["out"]
        layer = cls(_template_of(module), factors, module.groups, forward)
        if init == "preserve":
            layer._preserve(module)
        return layer.train(module.training)

    def _preserve(self, module):
        _preserve_exact(self, module.weight, module.bias)

    def _single(self, x, weight, bias):
        conv = _CONV_FN[len(self.stride)]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _chain(self, x):
        if any(self._pad):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        return super()._chain(x)

    def linear_part(self, x):
        # A subclass may pad at run time (Conv2dSame): zero-pad by the kernel's reach so that the
        # kernel fits the input; both sides see the same input, so the algebra is still compared.
        reach = [d * (k - 1) for d, k in zip(reversed(self.dilation), reversed(self._template.kernel_size))]
        return super().linear_part(F.pad(x, [r for r in reach for _ in range(2)]))

    def extra_repr(self):
        parts = []
        for f in self.factors:
            k = "x".join(map(str, f.kernel_size))
            parts.append(f"{f.in_channels}->{f.out_channels} {k}" + (f" s{f.stride}" if max(f.stride) > 1 else ""))
        return f"{self.kind} [{', '.join(parts)}], groups={self.groups}, forward={self.forward_mode}"


def _conv_base(module: nn.Module) -> type[nn.Module]:
    for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(module, t):
            return t
    raise TypeError(type(module).__name__)


def _cl_accepts(reason: str | None, module: nn.Module, pointwise: bool) -> str | None:
    """A conv kind's refusal, or CL's own: a 1x1 kernel only with ``pointwise``."""
    if reason is None and max(module.kernel_size) == 1 and not pointwise:
        return "1x1 convolution (pass pointwise=True / --pointwise to expand it)"
    return reason


@register_expansion
class ExpandedConvCL(ExpandedConv):
    """CL expansion: ``ConvNd k`` -> ``1x..x1 (m -> h1)``, ``k (h1 -> h2)``, ``1x..x1 (h2 -> n)``.

    The stride sits on the k-kernel factor (a 1x1 conv commutes with subsampling). Contraction
    multiplies the channel matrices at every kernel tap (DiverseBranchBlock's 1x1-kxk merge).
    """

    kind = "cl"
    priority = 1

    @classmethod
    def accepts(cls, module, pointwise=False):
        return _cl_accepts(super().accepts(module, pointwise), module, pointwise)

    @classmethod
    def hidden_for(cls, module, rate):
        g = module.groups
        return [algebra.hidden_width(module.in_channels, rate, g), algebra.hidden_width(module.out_channels, rate, g)]

    @classmethod
    def _factor_specs(cls, module, hidden):
        ones = (1,) * len(module.kernel_size)
        h1, h2 = hidden
        return [
            {"out": h1, "kernel_size": ones, "stride": 1},
            {"out": h2, "kernel_size": module.kernel_size, "stride": module.stride},
            {"out": module.out_channels, "kernel_size": ones, "stride": 1},
        ]


def _ck_accepts(reason: str | None, module: nn.Module) -> str | None:
    """A conv kind's refusal, or CK's own: it needs a kernel dimension > 3."""
    if reason is None and max(module.kernel_size) <= 3:
        return "kernel is 3 or smaller in every dimension (ck needs a dimension > 3)"
    return reason


def _ck_steps(module: nn.Module, hidden: Sequence[int]) -> tuple[list[tuple[int, ...]], list[int]]:
    """``(kernel steps, output widths)`` of a CK chain for ``module`` with these hidden widths."""
    steps = algebra.kernel_steps(module.kernel_size)
    if len(hidden) != len(steps) - 1:
        raise UsageError(
            f"a ck chain for kernel {'x'.join(map(str, module.kernel_size))} has {len(steps) - 1} hidden widths, "
            f"not {len(hidden)}"
        )
    return steps, [*hidden, module.out_channels]


@register_expansion
class ExpandedConvCK(ExpandedConv):
    """CK expansion: a ``ConvNd`` with a kernel dimension > 3 -> a chain of small kernels
    (3-tap steps, a 2-tap step for even sizes) whose sizes add up to the original, widths
    ``m -> h1 -> ... -> n``. Kernels compose by full convolution; the stride sits on the last
    factor; ``preserve`` initialisation is a least-squares fit that reports its residual.
    """

    kind = "ck"
    priority = 2

    @classmethod
    def accepts(cls, module, pointwise=False):
        return _ck_accepts(super().accepts(module, pointwise), module)

    @classmethod
    def hidden_for(cls, module, rate):
        steps = len(algebra.kernel_steps(module.kernel_size))
        g = module.groups
        first = algebra.hidden_width(module.in_channels, rate, g)
        rest = algebra.hidden_width(module.out_channels, rate, g)
        return [first] + [rest] * (steps - 2)

    @classmethod
    def _factor_specs(cls, module, hidden):
        steps, outs = _ck_steps(module, hidden)
        last = len(steps) - 1
        return [
            {"out": o, "kernel_size": k, "stride": module.stride if j == last else 1}
            for j, (o, k) in enumerate(zip(outs, steps))
        ]

    def _preserve(self, module):
        from .fit import fit_chain

        with torch.no_grad():
            result = fit_chain(module.weight.detach(), [f.weight.detach() for f in self.factors], self.groups)
            for f, w in zip(self.factors, result.weights):
                f.weight.copy_(w)
            _set_biases(self, module.bias)
        self.fit_residual = result.residual
        tol = PRESERVE_TOL.get(module.weight.dtype, 1e-2)
        if result.residual > tol:
            params = sum(f.weight.numel() for f in self.factors)
            raise PreserveFitError(
                f"init='preserve' found no exact factorisation of this {'x'.join(map(str, module.kernel_size))} "
                f"kernel at widths {[f.out_channels for f in self.factors[:-1]]}: best relative residual "
                f"{result.residual:.2g} > {tol:g} ({params} factor weights for {module.weight.numel()} kernel "
                f"entries); a larger rate (5x5 to 9x9 fit exactly at rate 4) or init='scratch' will do"
            )


# --------------------------------------------------------------------------------------------------
# Preserve initialisation (exact for FC and CL)
# --------------------------------------------------------------------------------------------------
def _set_biases(layer: ExpandedLayer, bias: torch.Tensor | None) -> None:
    if bias is None:
        return
    for f in layer.factors[:-1]:
        f.bias.zero_()
    layer.factors[-1].bias.copy_(bias)


@torch.no_grad()
def _preserve_exact(layer: ExpandedLayer, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Three-factor chain ``P3 K P1`` equal to ``weight``: ``P1`` has orthonormal columns, ``P3``
    orthonormal rows (per group), and ``K = P3ᵀ W P1ᵀ`` at every tap, so ``P3 K P1 = W`` exactly
    (needs h1 >= m and h2 >= n, i.e. rate >= 1). Biases: zero, zero, original."""
    first, mid, last = layer.factors
    g = layer.groups
    h1, m_g = first.weight.shape[:2]
    n, h2_g = last.weight.shape[:2]
    taps = weight.shape[2:]
    p1 = _orthonormal(h1 // g, m_g, g, weight).reshape(g, h1 // g, m_g)
    p3 = _orthonormal(n // g, h2_g, g, weight).reshape(g, n // g, h2_g)
    w = weight.reshape(g, n // g, m_g, -1)
    k = torch.einsum("gnh,gnmt,gim->ghit", p3, w, p1)  # per tap: P3ᵀ W P1ᵀ
    first.weight.copy_(p1.reshape(first.weight.shape))
    mid.weight.copy_(k.reshape(g * h2_g, h1 // g, *taps).reshape(mid.weight.shape))
    last.weight.copy_(p3.reshape(last.weight.shape))
    _set_biases(layer, bias)


def _check_modes(init: str, forward: str) -> None:
    if init not in INIT_MODES:
        raise UsageError(f"unknown init {init!r}; use one of {', '.join(INIT_MODES)}")
    if forward not in FORWARD_MODES:
        raise UsageError(f"unknown forward mode {forward!r}; use one of {', '.join(FORWARD_MODES)}")


def factor_parameters(cls: type[ExpandedLayer], module: nn.Module, hidden: Sequence[int]) -> tuple[list[str], int]:
    """Descriptions and total parameter count of the factors, without building them."""
    if cls is ExpandedLinear:
        widths = [module.in_features, *hidden, module.out_features]
        bias = module.bias is not None
        descs = [f"Linear {a}->{b}" for a, b in zip(widths[:-1], widths[1:])]
        return descs, sum(a * b + (b if bias else 0) for a, b in zip(widths[:-1], widths[1:]))
    g, c_in, total, descs = module.groups, module.in_channels, 0, []
    for spec in cls._factor_specs(module, hidden):
        k = spec["kernel_size"]
        bias = spec.get("bias", module.bias is not None)
        total += spec["out"] * (c_in // g) * math.prod(k) + (spec["out"] if bias else 0)
        stride = spec["stride"] if isinstance(spec["stride"], tuple) else (spec["stride"],)
        desc = f"{c_in}->{spec['out']} {'x'.join(map(str, k))}" + (f" s{stride[0]}" if max(stride) > 1 else "")
        descs.append(desc + (f" g{g}" if g > 1 else ""))  # every factor keeps the layer's groups
        c_in = spec["out"]
    return descs, total


# --------------------------------------------------------------------------------------------------
# Transposed convolutions
# --------------------------------------------------------------------------------------------------
TRANSPOSED_TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_CONV_TRANSPOSE_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

#: The transposed-convolution classes of the conv kinds: same strategy names, so ``cl`` / ``ck``
#: select both. :func:`expansion_for` picks the class for a module.
TRANSPOSED_EXPANSIONS: dict[str, type[ExpandedLayer]] = {}


def expansion_for(kind: str, module: nn.Module) -> type[ExpandedLayer]:
    """The class that expands ``module`` with ``kind`` (a transposed conv has its own)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and kind in TRANSPOSED_EXPANSIONS:
        return TRANSPOSED_EXPANSIONS[kind]
    return EXPANSIONS[kind]


def _conv_layout_shape(weight_shape: Sequence[int], groups: int) -> tuple[int, ...]:
    """Shape of :func:`algebra.flip_transpose` of a ``(in, out / groups, *taps)`` kernel."""
    c_in, c_out_g = weight_shape[:2]
    return (c_out_g * groups, c_in // groups, *weight_shape[2:])


class ExpandedConvTranspose(ExpandedLayer):
    """Shared machinery of transposed CL and CK: a chain of ``ConvTransposeNd`` factors.

    A transposed conv upsamples its input by the stride, fully convolves it with the kernel, then
    crops ``padding`` from both ends (``output_padding`` fewer on the far end). Exactness rules,
    the mirror image of the conv ones: the stride and ``output_padding`` sit on the first spatial
    factor (upsample once, before any kernel), the padding (the crop) on the last one, and only
    factors from the last spatial one on have a bias (a full convolution of a constant bias field
    is not constant at its border). Every factor keeps ``groups`` and the dilation.
    """

    source_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    #: Index of the factor that upsamples (carries the stride and output_padding).
    _upsampling: ClassVar[int] = 0

    def __init__(self, template, factors, groups, forward):
        super().__init__(template, factors, groups, forward)
        t = template
        self.stride = t.stride
        self.padding = t.padding
        self.output_padding = t.output_padding
        self.dilation = t.dilation
        self._order = algebra.chain_order(tuple(_conv_layout_shape(f.weight.shape, groups) for f in self.factors))

    @classmethod
    def accepts(cls, module, pointwise=False):
        if not isinstance(module, cls.source_types):
            return f"{type(module).__name__} is not a ConvTranspose1d/2d/3d"
        if type(module) not in cls.source_types:
            return f"{_qualname(module)} subclasses a transposed convolution; its meaning is unknown"
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False)):
            return "lazy module is not initialised yet; run one forward pass first"
        return None

    @classmethod
    def hidden_for(cls, module, rate):
        return EXPANSIONS[cls.kind].hidden_for(module, rate)

    @classmethod
    def from_module(cls, module, hidden, init="scratch", forward="fused"):
        _check_modes(init, forward)
        conv_t = TRANSPOSED_TYPES[len(module.kernel_size)]
        kw = {"device": module.weight.device, "dtype": module.weight.dtype}
        factors, c_in = [], module.in_channels
        for spec in cls._factor_specs(module, hidden):
            factors.append(
                conv_t(
                    c_in,
                    spec["out"],
                    spec["kernel_size"],
                    stride=spec["stride"],
                    padding=spec["padding"],
                    output_padding=spec["output_padding"],
                    groups=module.groups,
                    bias=spec["bias"],
                    dilation=module.dilation,
                    **kw,
                )
            )
            c_in = spec["out"]
        layer = cls(_template_of(module), factors, module.groups, forward)
        if init == "preserve":
            layer._preserve(module)
        return layer.train(module.training)

    def _compose(self, weights, biases, fast: bool = False):
        return algebra.compose_transposed_chain(weights, biases, self.groups, self._order)

    def forward(self, x: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        output_padding = self.output_padding
        if output_size is not None:  # torch's rule: which output_padding gives that size
            dims = len(self.stride)
            k = self._template.kernel_size
            output_padding = self._template._output_padding(
                x, output_size, self.stride, self.padding, k, dims, self.dilation
            )
        if self.forward_mode == "fused":
            weight, bias = self.equivalent()
            return self._single(x, weight, bias, output_padding)
        return self._chain(x, output_padding)

    def _single(self, x, weight, bias, output_padding=None):
        op = self.output_padding if output_padding is None else output_padding
        fn = _CONV_TRANSPOSE_FN[len(self.stride)]
        return fn(x, weight, bias, self.stride, self.padding, op, self.groups, self.dilation)

    def _chain(self, x, output_padding=None):
        fn = _CONV_TRANSPOSE_FN[len(self.stride)]
        for j, f in enumerate(self.factors):
            op = output_padding if output_padding is not None and j == self._upsampling else f.output_padding
            x = fn(x, f.weight, f.bias, f.stride, f.padding, op, f.groups, f.dilation)
        return x

    def _preserve(self, module):
        """Fit in the conv layout (:func:`algebra.flip_transpose` of every kernel), copy back."""
        g = self.groups
        target = algebra.flip_transpose(module.weight.detach(), g)
        shims = [_Shim(algebra.flip_transpose(f.weight.detach(), g).clone()) for f in self.factors]
        self.fit_residual = self._fit(module, target, shims)
        with torch.no_grad():
            for f, s in zip(self.factors, shims):
                f.weight.copy_(algebra.flip_transpose(s.weight, g))
                if f.bias is not None:
                    f.bias.zero_()
            if module.bias is not None:
                self.factors[-1].bias.copy_(module.bias)

    def extra_repr(self):
        parts = []
        for f in self.factors:
            k = "x".join(map(str, f.kernel_size))
            parts.append(f"{f.in_channels}->{f.out_channels} {k}" + (f" s{f.stride}" if max(f.stride) > 1 else ""))
        return f"{self.kind} transposed [{', '.join(parts)}], groups={self.groups}, forward={self.forward_mode}"


class _Shim:
    """Stands in for a factor (just its ``weight``) so the conv-layout fits can fill it."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.bias = None

    @staticmethod
    def chain(shims: Sequence[_Shim], groups: int):
        """An object with the ``factors`` and ``groups`` that :func:`_preserve_exact` reads."""
        return types.SimpleNamespace(factors=shims, groups=groups)


class ExpandedConvTransposeCL(ExpandedConvTranspose):
    """CL for ``ConvTransposeNd k``: ``1x..x1 (m -> h1, no bias)``, ``k transposed (h1 -> h2)`` with
    the stride, padding and output_padding, ``1x..x1 (h2 -> n)``. The 1x1 factors commute with the
    upsampling and the crop, so the chain is exact; the first has no bias (see the class above)."""

    kind = "cl"
    priority = 1
    _upsampling = 1

    @classmethod
    def accepts(cls, module, pointwise=False):
        return _cl_accepts(super().accepts(module, pointwise), module, pointwise)

    @classmethod
    def _factor_specs(cls, module, hidden):
        ones = (1,) * len(module.kernel_size)
        h1, h2 = hidden
        bias = module.bias is not None
        plain = {"stride": 1, "padding": 0, "output_padding": 0}
        return [
            {"out": h1, "kernel_size": ones, "bias": False, **plain},
            {
                "out": h2,
                "kernel_size": module.kernel_size,
                "stride": module.stride,
                "padding": module.padding,
                "output_padding": module.output_padding,
                "bias": bias,
            },
            {"out": module.out_channels, "kernel_size": ones, "bias": bias, **plain},
        ]

    def _fit(self, module, target, shims):
        _preserve_exact(_Shim.chain(shims, self.groups), target, None)
        return 0.0


class ExpandedConvTransposeCK(ExpandedConvTranspose):
    """CK for ``ConvTransposeNd`` with a kernel dimension > 3: small transposed kernels (3-tap
    steps, a 2-tap one for even sizes) whose full convolutions add up to the original; the first
    factor upsamples (stride, output_padding), the last crops (padding) and alone has a bias."""

    kind = "ck"
    priority = 2

    @classmethod
    def accepts(cls, module, pointwise=False):
        return _ck_accepts(super().accepts(module, pointwise), module)

    @classmethod
    def _factor_specs(cls, module, hidden):
        steps, outs = _ck_steps(module, hidden)
        last = len(steps) - 1
        return [
            {
                "out": o,
                "kernel_size": k,
                "stride": module.stride if j == 0 else 1,
                "output_padding": module.output_padding if j == 0 else 0,
                "padding": module.padding if j == last else 0,
                "bias": module.bias is not None and j == last,
            }
            for j, (o, k) in enumerate(zip(outs, steps))
        ]

    def _fit(self, module, target, shims):
        from .fit import fit_chain

        with torch.no_grad():
            result = fit_chain(target, [s.weight for s in shims], self.groups)
            for s, w in zip(shims, result.weights):
                s.weight = w
        tol = PRESERVE_TOL.get(module.weight.dtype, 1e-2)
        if result.residual > tol:
            raise PreserveFitError(
                f"init='preserve' found no exact factorisation of this transposed "
                f"{'x'.join(map(str, module.kernel_size))} kernel at widths "
                f"{[f.out_channels for f in self.factors[:-1]]}: best relative residual {result.residual:.2g} > "
                f"{tol:g}; a larger rate or init='scratch' will do"
            )
        return result.residual


TRANSPOSED_EXPANSIONS["cl"] = ExpandedConvTransposeCL
TRANSPOSED_EXPANSIONS["ck"] = ExpandedConvTransposeCK
