"""The base of every expansion kind, the registry of kinds, and gradient-accumulation support.

Every kind has the same two verbs:

* :meth:`ExpandedLayer.equivalent` -- the expansion's single ``(weight, bias)``, differentiable in
  its parameters;
* :meth:`ExpandedLayer.contract` -- a module of the original class and attributes holding them.

and two forward modes with the same function (in eval mode): ``"explicit"`` runs the expansion's
layers on the activations, ``"fused"`` (default) composes the kernel and runs a single layer, so
training costs close to the compact layer (OREPA-style online re-parameterisation). Kinds whose
branches end in a BatchNorm (``acb``, ``rep``, ``dbb``) run explicitly while training, since
batch statistics are not a fixed linear map; in eval mode they fuse like the others.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn as nn

from .. import algebra
from ..errors import UsageError
from .hosts import fused_only_reason, run_host

__all__ = [
    "ExpandedLayer",
    "ChainLayer",
    "ComposeOnce",
    "EXPANSIONS",
    "register_expansion",
    "expansion_for",
    "strategy_names",
    "factor_parameters",
    "FORWARD_MODES",
    "INIT_MODES",
    "PRESERVE_TOL",
]

FORWARD_MODES = ("fused", "explicit")
INIT_MODES = ("scratch", "preserve")

#: Relative residual above which a CK ``preserve`` fit counts as failed, by factor dtype. Exact
#: fits land at 1e-15..5e-11 in float64 and, after rounding to float32, up to ~2e-5 (depthwise 9x9);
#: fits that fail stay above 1e-2.
PRESERVE_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}

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


def template_of(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its ``weight`` and ``bias``: same class, attributes and hooks.

    Pre-seeding deepcopy's memo maps those two parameters to ``None``, so they are not copied. Any
    other state (a subclass's gain, a quantiser's scale) is copied: a subclass layer runs its own
    forward on the composed kernel and needs it (see :func:`~.hosts.fused_only_reason`).
    """
    memo = {id(p): None for name, p in module._parameters.items() if name in ("weight", "bias") and p is not None}
    return copy.deepcopy(module, memo)


def check_modes(init: str, forward: str) -> None:
    if init not in INIT_MODES:
        raise UsageError(f"unknown init {init!r}; use one of {', '.join(INIT_MODES)}")
    if forward not in FORWARD_MODES:
        raise UsageError(f"unknown forward mode {forward!r}; use one of {', '.join(FORWARD_MODES)}")


class ExpandedLayer(nn.Module):
    """Base class of every expansion kind: the template of the replaced layer, the forward modes,
    the cached composition and the contraction. Subclasses say how to compose (:meth:`_compose`),
    how to run explicitly (:meth:`_explicit`) and how to run one layer (:meth:`_single`)."""

    #: Strategy name (``--strategy``); several classes share one for different layer types.
    kind: ClassVar[str] = ""
    #: One line for the CLI help and the docs.
    summary: ClassVar[str] = ""
    #: Why the explicit mode cannot run this layer (a subclass with its own forward), else ``None``.
    fused_only: str | None = None
    #: Higher runs first when several kinds accept the same layer (ck before cl).
    priority: ClassVar[int] = 0
    source_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Whether training runs the same composed kernel that contraction folds (False where branches
    #: carry a BatchNorm with batch statistics, or a BatchNorm follows the sum: then training runs
    #: :meth:`_train_forward`, and eval mode fuses as usual).
    trains_on_equivalent: ClassVar[bool] = True
    #: Rate used when the caller gives none (``None``: the kind has no width to set).
    default_rate: ClassVar[float | None] = 4.0

    def __init__(self, template: nn.Module, forward: str):
        super().__init__()
        # Stored outside the module tree: the template must not show up in state_dict/modules().
        object.__setattr__(self, "_template", template)
        self.forward_mode = forward
        self.fit_residual: float | None = None
        self._cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        #: Set by :class:`ComposeOnce`: the composed kernel as leaves, shared by several forwards.
        self._held: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.fused_only = fused_only_reason(template)
        if self.fused_only is not None:
            # Registered, so that the subclass's own state (a gain, a quantiser's scale) trains,
            # moves and saves with the expansion; its weight and bias are the composed ones.
            self.host = template

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def accepts(cls, module: nn.Module, pointwise: bool = False) -> str | None:
        """``None`` if this kind can expand ``module``, else the reason it cannot."""
        raise NotImplementedError

    @classmethod
    def hidden_for(cls, module: nn.Module, rate: float) -> list[int]:
        """Hidden widths of the expansion at expansion rate ``rate`` (the structure's one parameter)."""
        raise NotImplementedError

    @classmethod
    def from_module(
        cls, module: nn.Module, hidden: Sequence[int], init: str = "scratch", forward: str = "fused"
    ) -> ExpandedLayer:
        raise NotImplementedError

    @classmethod
    def describe(cls, module: nn.Module, hidden: Sequence[int]) -> tuple[list[str], int]:
        """``(one description per factor or branch, parameter count)``, without building anything."""
        raise NotImplementedError

    # --- the two verbs ------------------------------------------------------------------------
    def equivalent(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The expansion's single ``(weight, bias)``; differentiable in its parameters.

        Without autograd (evaluation, export, contraction) the result is cached until a parameter or
        buffer changes (tracked by tensor version counters), so validation loops compose once.
        """
        if self._held is not None and torch.is_grad_enabled():
            return self._held
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if not grad:
            key = tuple(
                (t.data_ptr(), t._version, t.dtype, t.device)
                for t in itertools.chain(self.parameters(), self.buffers())
            )
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        # Composition runs at the parameters' precision even under autocast: rounding the product of
        # a chain in bf16 loses far more than rounding the one convolution that follows.
        device = next(self.parameters()).device.type
        with torch.autocast(device, enabled=False):
            result = self._compose(fast=grad)
        self._cache = None if grad else (key, result)
        return result

    def _compose(self, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The composed ``(weight, bias)``; ``fast`` (training) may use a faster composition, a few
        1e-6 off in float32; contraction and every check use the exact direct algebra."""
        raise NotImplementedError

    @torch.no_grad()
    def contract(self) -> nn.Module:
        """A module of the original class and attributes computing exactly this expansion (in eval
        mode). A kind whose branches add a shift (a folded BatchNorm) gives a bias to a layer that
        had none: the contracted layer is the same class with ``bias`` set."""
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
            return run_host(self.host, x, *self.equivalent())
        if self.training and not self.trains_on_equivalent:
            return self._train_forward(x)
        if self.forward_mode == "fused":
            weight, bias = self.equivalent()
            return self._single(x, weight, bias)
        return self._explicit(x)

    def _train_forward(self, x):
        """The training forward of a kind whose training function is not its contracted kernel."""
        return self._explicit(x)

    def _single(self, x, weight, bias):
        raise NotImplementedError

    def _explicit(self, x):
        raise NotImplementedError

    def linear_part(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(one layer with the composed kernel, the expansion run explicitly on x)``, both without
        any subclass transform: the algebra a fused-only layer rests on, for the contraction check."""
        weight, bias = self.equivalent()
        return self._single(x, weight, bias), self._explicit(x)

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
        raise NotImplementedError

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


class ChainLayer(ExpandedLayer):
    """A serial chain: ``factors`` (an ``nn.ModuleList``) applied first to last, every factor with
    the same ``groups``; composed by :func:`algebra.compose_chain` (ExpandNets' FC, CL, CK)."""

    def __init__(self, template: nn.Module, factors: Sequence[nn.Module], groups: int, forward: str):
        super().__init__(template, forward)
        self.factors = nn.ModuleList(factors)
        self.groups = groups
        #: How training composes the kernel (algebra.COMPOSE_METHODS); contraction is always direct.
        self.composition = "auto"
        self._order = algebra.chain_order(tuple(tuple(f.weight.shape) for f in self.factors))

    def _compose(self, fast: bool = False):
        weights = [f.weight for f in self.factors]
        biases = [f.bias for f in self.factors] if any(f.bias is not None for f in self.factors) else None
        if fast:
            return algebra.compose_chain_fast(weights, biases, self.groups, self._order, self.composition)
        return algebra.compose_chain(weights, biases, self.groups, self._order)

    def _explicit(self, x):
        for f in self.factors:
            x = f(x)
        return x

    def config(self) -> dict:
        # Output widths of the factors (``out_channels`` of a transposed factor is its weight's
        # second dimension times groups, not its first).
        widths = [getattr(f, "out_channels", None) or f.out_features for f in self.factors[:-1]]
        return {"kind": self.kind, "hidden": widths}


class ComposeOnce:
    """Compose each fused layer's kernel once for several forward passes (gradient accumulation).

    Inside the block every layer's :meth:`~ExpandedLayer.equivalent` (with autograd on) returns the
    same composed ``(weight, bias)`` as leaf tensors, whose gradients accumulate over the passes;
    :meth:`backward` then sends the sum through the compositions once. By linearity of the
    gradient, the parameters get the sum of the per-pass gradients, at one composition per step::

        with ComposeOnce(layers) as once:
            for x, y in micro_batches:
                (loss_fn(model(x), y) / n).backward()
            once.backward()
    """

    def __init__(self, layers: Sequence[ExpandedLayer]):
        self.layers = [
            layer
            for layer in layers
            if layer.forward_mode == "fused" and (layer.trains_on_equivalent or not layer.training)
        ]
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


# --------------------------------------------------------------------------------------------------
# The registry: strategy name -> the classes that implement it, one per layer type
# --------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, list[type[ExpandedLayer]]] = {}


class _Registry(Mapping):
    """Read-only view ``{strategy name: (classes...)}`` of the registered kinds."""

    def __getitem__(self, kind: str) -> tuple[type[ExpandedLayer], ...]:
        return tuple(_REGISTRY[kind])

    def __iter__(self):
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"EXPANSIONS({', '.join(_REGISTRY)})"


#: Every strategy name with the classes that implement it (``EXPANSIONS["cl"]`` holds the conv and
#: the transposed-conv classes). Extended by :func:`register_expansion`.
EXPANSIONS: Mapping[str, tuple[type[ExpandedLayer], ...]] = _Registry()


def register_expansion(cls: type[ExpandedLayer]) -> type[ExpandedLayer]:
    """Class decorator adding an expansion class to the registry under ``cls.kind``. A second class
    for a name that already has one for an overlapping layer type is refused."""
    if not cls.kind or not cls.source_types:
        raise ValueError(f"{cls.__name__} needs a kind and source_types to be registered")
    for other in _REGISTRY.get(cls.kind, []):
        if set(other.source_types) & set(cls.source_types):
            raise ValueError(f"expansion kind {cls.kind!r} is already registered for {other.source_types}")
    _REGISTRY.setdefault(cls.kind, []).append(cls)
    return cls


def strategy_names() -> list[str]:
    """Registered strategy names, in registration order."""
    return list(_REGISTRY)


def expansion_for(kind: str, module: nn.Module) -> type[ExpandedLayer] | None:
    """The class that expands ``module`` with strategy ``kind``, or ``None`` if ``kind`` has none for
    its type. Exact types first (a transposed conv is a ``_ConvNd`` but takes the transposed class)."""
    classes = _REGISTRY.get(kind)
    if not classes:
        raise UsageError(f"unknown expansion kind {kind!r}; registered: {', '.join(_REGISTRY)}")
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    for cls in classes:
        is_transposed_cls = all(issubclass(t, nn.modules.conv._ConvTransposeNd) for t in cls.source_types)
        if isinstance(module, cls.source_types) and transposed == is_transposed_cls:
            return cls
    return None


def factor_parameters(cls: type[ExpandedLayer], module: nn.Module, hidden: Sequence[int]) -> tuple[list[str], int]:
    """Descriptions and total parameter count of an expansion, without building it."""
    return cls.describe(module, hidden)
