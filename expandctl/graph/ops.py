"""Which traced operations are linear, and what each does to an :class:`~.affine.Affine`.

:func:`linear_step` looks at one fx node and returns a :class:`Step` (the node's tensor inputs and
a function of their maps) when the node is linear in its non-constant inputs, or ``None``; for
operations that look linear but are not exactly one layer (BatchNorm with batch statistics,
average pooling that does not count the padding, a conv with reflect padding) it says why in
``Step.refused``. Constants are any node that does not depend on the model's input: their values
come from a recorded run.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .affine import Affine, NotOneLayer

__all__ = ["Step", "linear_step", "ROOT"]

#: Stands for the region's input in a step's arguments; turned into the identity of the right layout.
ROOT = object()

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_AVG_FUNCS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
#: Average pooling's settings, in ``F.avg_pool2d``'s order (an ``nn.AvgPool2d`` has each as an attribute).
_AVG_SETTINGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_PASS_METHODS = {"contiguous", "clone", "detach"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_", "__sub__"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", "__rmul__"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_", "__truediv__"}
_NEG = {operator.neg, torch.neg, "neg"}
_RANDOM = {torch.rand, torch.randn, torch.rand_like, torch.randn_like, torch.bernoulli, torch.randint, torch.normal}


@dataclass
class Step:
    """A linear node: ``apply(maps)`` gives its map from its tensor inputs' maps (``ROOT`` for the
    region input). ``weighted`` counts it as a layer; ``kind`` names it in the plan."""

    inputs: tuple[fx.Node, ...]
    apply: Callable[..., Affine] | None
    kind: str
    weighted: bool = False
    refused: str | None = None
    modules: list[str] = field(default_factory=list)
    own_params: int = 0


def _tuple(v, nd: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(x) for x in v)
    return v * nd if len(v) == 1 else v


def _shape(values, node) -> tuple[int, ...] | None:
    v = values.get(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _identity_like(values, node, layout: str, nd: int | None = None) -> Affine:
    shape = _shape(values, node)
    if shape is None or len(shape) < 2:
        raise NotOneLayer("an input that is not a batch of feature maps or vectors")
    if layout == "linear":
        return Affine.identity(shape[-1], 0, "linear", values[node])
    if nd is not None and len(shape) != nd + 2:
        raise NotOneLayer(f"a {nd}-d layer on a tensor of rank {len(shape)}")
    return Affine.identity(shape[1], len(shape) - 2, "conv", values[node])


def _resolve(rep, values, node, layout: str, nd: int | None = None) -> Affine:
    """``rep`` itself, or the identity of ``node`` when it is the region input."""
    return _identity_like(values, node, layout, nd) if rep is ROOT else rep


def _same(rep):
    """A pass-through (identity, dropout in eval mode, contiguous): the region input stays undecided."""
    return rep


def _default_layout(values, node) -> str:
    shape = _shape(values, node)
    return "linear" if shape is not None and len(shape) == 2 else "conv"


def _conv_padding(padding, kernel, dilation, nd) -> tuple[int, ...]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * nd
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in total):
            raise NotOneLayer("padding='same' with an even kernel pads unevenly")
        return tuple(t // 2 for t in total)
    return _tuple(padding, nd)


def _channel_vector(const: torch.Tensor, out_shape: tuple[int, ...], layout: str) -> torch.Tensor | None:
    """A constant that acts per channel (or as a scalar) on a tensor of ``out_shape``, as a vector."""
    c = const if isinstance(const, torch.Tensor) else torch.tensor(float(const))
    c = c.detach().double()
    if c.dim() > len(out_shape):
        return None
    full = (1,) * (len(out_shape) - c.dim()) + tuple(c.shape)
    axis = len(out_shape) - 1 if layout == "linear" else 1
    channels = out_shape[axis]
    for i, n in enumerate(full):
        if i != axis and n != 1:
            return None
    if full[axis] not in (1, channels):
        return None
    return c.reshape(-1).expand(channels).clone() if c.numel() == 1 else c.reshape(channels)


def _args(node: fx.Node, names: list[str], defaults: dict) -> dict:
    out = dict(defaults)
    for name, a in zip(names, node.args):
        out[name] = a
    out.update(node.kwargs)
    return out


class _Lookup:
    """Concrete values of constant nodes and of plain Python arguments."""

    def __init__(self, values, is_const):
        self.values, self.is_const = values, is_const

    def __call__(self, a):
        if isinstance(a, fx.Node):
            return self.values[a]
        return a

    def tensor_inputs(self, args) -> tuple[fx.Node, ...]:
        """The argument nodes that carry activations (not constants, not sizes read off a tensor)."""
        found = []
        for a in args:
            if (
                isinstance(a, fx.Node)
                and not self.is_const[a]
                and isinstance(self.values.get(a), torch.Tensor)
                and a not in found
            ):
                found.append(a)
        return tuple(found)


def _conv_step(node, values, inputs, x, w, b, stride, padding, dilation, groups, nd, weighted_name) -> Step:
    kernel = tuple(w.shape[2:])
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)

    def apply(rep):
        pad = _conv_padding(padding, kernel, dilation, nd)
        return _resolve(rep, values, x, "conv", nd).then_conv(w, b, stride, pad, dilation, groups)

    own = w.numel() + (b.numel() if isinstance(b, torch.Tensor) else 0)
    return Step(inputs, apply, f"Conv{nd}d", True, modules=weighted_name, own_params=own)


def _module_step(node: fx.Node, gm: fx.GraphModule, values, look: _Lookup) -> Step | None:
    m = gm.get_submodule(node.target)
    inputs = look.tensor_inputs(node.args)
    if len(node.args) != 1 or node.kwargs or len(inputs) != 1:
        return None
    x = node.args[0]
    here = [node.target]
    base = next((c for c in _CONV_MODULES if isinstance(m, c)), None)
    if base is not None and type(m).forward is base.forward and type(m)._conv_forward is base._conv_forward:
        nd = m.weight.dim() - 2
        if m.padding_mode != "zeros" and any(_tuple(m.padding, nd) if not isinstance(m.padding, str) else (1,)):
            return Step(inputs, None, f"Conv{nd}d", True, f"padding mode {m.padding_mode!r} (not zero padding)", here)
        step = _conv_step(
            node, values, inputs, x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, nd, here
        )
        return step
    if type(m) is nn.Linear:
        return Step(
            inputs,
            lambda rep: _resolve(rep, values, x, "linear").then_linear(m.weight, m.bias),
            "Linear",
            True,
            modules=here,
            own_params=sum(t.numel() for t in m.parameters()),
        )
    if type(m) in _BN_MODULES:
        if m.training or not m.track_running_stats or m.running_mean is None:
            return Step(inputs, None, "BatchNorm", False, "BatchNorm with batch statistics (train mode)", here)
        return _bn_step(inputs, values, x, m.running_mean, m.running_var, m.weight, m.bias, m.eps, here)
    if isinstance(m, _PASS_MODULES):
        return Step(inputs, _same, "identity", modules=here)
    if type(m) in _AVG_MODULES:
        settings = {k: getattr(m, k, None) for k in _AVG_SETTINGS}  # AvgPool1d has no divisor_override
        return _avg_step(inputs, values, x, settings, _AVG_MODULES.index(type(m)) + 1, here)
    if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)) or (
        isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)) and m.value == 0
    ):
        return _pad_step(inputs, values, x, m.padding, here)
    return None


def _bn_step(inputs, values, x, mean, var, gamma, beta, eps, here) -> Step:
    def apply(rep):
        shape = _shape(values, x)
        layout = "linear" if shape is not None and len(shape) == 2 else "conv"
        r = _resolve(rep, values, x, layout)
        if r.layout == "linear" and shape is not None and len(shape) != 2:
            raise NotOneLayer("a BatchNorm over dim 1 of a channel-last map")
        s = torch.rsqrt(var.double() + eps)
        if gamma is not None:
            s = s * gamma.double()
        t = -mean.double() * s
        if beta is not None:
            t = t + beta.double()
        return r.scale_shift(s, t)

    return Step(inputs, apply, "BatchNorm", False, modules=here)


def _avg_step(inputs, values, x, settings: dict, nd: int, here) -> Step:
    """Average pooling with ``settings`` (:data:`_AVG_SETTINGS`, as ``F.avg_pool{nd}d`` takes them)."""
    if not settings["count_include_pad"]:
        return Step(
            inputs,
            None,
            "AvgPool",
            False,
            "average pooling with count_include_pad=False divides by a border-dependent count",
            here,
        )
    if settings["divisor_override"]:
        return Step(inputs, None, "AvgPool", False, "average pooling with a divisor_override", here)
    kernel = _tuple(settings["kernel_size"], nd)
    stride = _tuple(settings["stride"] if settings["stride"] else kernel, nd)
    padding = _tuple(settings["padding"], nd)

    def apply(rep):
        if settings["ceil_mode"]:
            shape = _shape(values, x)
            for L, k, s, p in zip(shape[2:], kernel, stride, padding):
                if (L + 2 * p - k) % s:
                    raise NotOneLayer("average pooling with ceil_mode=True that adds a partial window")
        return _resolve(rep, values, x, "conv", nd).then_avg_pool(kernel, stride, padding)

    return Step(inputs, apply, f"AvgPool{nd}d", False, modules=here)


def _pad_step(inputs, values, x, pads, here) -> Step:
    def apply(rep):
        shape = _shape(values, x)
        nd = len(shape) - 2
        p = _tuple(pads, 2 * nd) if not isinstance(pads, int) else (pads,) * (2 * nd)
        if len(p) != 2 * nd or any(p[2 * i] != p[2 * i + 1] for i in range(nd)):
            raise NotOneLayer("uneven zero padding (or padding of the channel or batch dims)")
        per_dim = tuple(reversed(p[0::2]))
        return _resolve(rep, values, x, "conv", nd).then_pad(per_dim)

    return Step(inputs, apply, "pad", False, modules=here)


def _arith_step(node: fx.Node, values, look: _Lookup, op) -> Step | None:
    args = list(node.args)
    alpha = node.kwargs.get("alpha", 1)
    if len(args) != 2 or any(k not in ("alpha",) for k in node.kwargs):
        return None
    inputs = look.tensor_inputs(args)
    if not inputs or len(inputs) > 2:
        return None
    out_shape = _shape(values, node)
    a, b = args
    if len(inputs) == 2 or (isinstance(a, fx.Node) and a is b):
        if op not in ("add", "sub"):
            return None  # a product of two activations is not linear
        sign = alpha if op == "add" else -alpha
        if _shape(values, a) != out_shape or _shape(values, b) != out_shape:
            return None

        def apply_two(ra, rb=None):
            rb = ra if rb is None else rb
            lay = ra.layout if ra is not ROOT else (rb.layout if rb is not ROOT else _default_layout(values, a))
            return _resolve(ra, values, a, lay).plus(_resolve(rb, values, b, lay), float(sign))

        return Step(inputs, apply_two, op)
    (x,) = inputs
    other = b if a is x else a
    if _shape(values, x) != out_shape:
        return None  # the constant broadcasts the tensor to another shape
    const = look(other)
    if isinstance(const, torch.Tensor) and const.is_complex():
        return None

    def apply_one(rep):
        lay = rep.layout if rep is not ROOT else _default_layout(values, x)
        vec = _channel_vector(const, out_shape, lay)
        if vec is None:
            raise NotOneLayer("a constant that varies over space or batch")
        r = _resolve(rep, values, x, lay)
        if op == "add":
            return r.scale_shift(None, vec * alpha)
        if op == "sub":
            return r.scale_shift(None, -vec * alpha) if a is x else r.scale_shift(-1.0, vec)
        if op == "mul":
            return r.scale_shift(vec, None)
        if a is not x:
            raise NotOneLayer("a constant divided by an activation")
        return r.scale_shift(1.0 / vec, None)

    return Step(inputs, apply_one, op)


def _function_step(node: fx.Node, values, look: _Lookup) -> Step | None:
    t = node.target
    if t in (torch.reshape, torch.flatten):
        return _reshape_step(node, values, look)
    for op, names in (("add", _ADD), ("sub", _SUB), ("mul", _MUL), ("div", _DIV)):
        if t in names:
            return _arith_step(node, values, look, op)
    if t in _NEG:
        (x,) = node.args
        return Step(
            look.tensor_inputs([x]),
            lambda rep: _resolve(rep, values, x, _default_layout(values, x)).scale_shift(-1.0, None),
            "neg",
        )
    if t in _CONV_FUNCS:
        return _conv_function_step(node, values, look, _CONV_FUNCS[t])
    if t is F.linear:
        return _linear_function_step(node, values, look)
    if t is F.batch_norm:
        return _bn_function_step(node, values, look)
    if t in _AVG_FUNCS:
        return _avg_function_step(node, values, look, _AVG_FUNCS[t])
    if t is F.pad:
        a = _args(node, ["input", "pad", "mode", "value"], {"mode": "constant", "value": None})
        x = a["input"]
        if a["mode"] != "constant" or a["value"] not in (None, 0, 0.0):
            return Step(look.tensor_inputs([x]), None, "pad", False, f"padding with mode {a['mode']!r} or a value")
        return _pad_step(look.tensor_inputs([x]), values, x, tuple(a["pad"]), [])
    if t is F.dropout and not _args(node, ["input", "p", "training"], {"training": True})["training"]:
        x = node.args[0] if node.args else node.kwargs["input"]
        return Step(look.tensor_inputs([x]), _same, "identity")
    return None


def _conv_function_step(node: fx.Node, values, look: _Lookup, nd: int) -> Step | None:
    """``F.conv{1,2,3}d`` with a constant kernel (a kernel computed from the input is no step)."""
    a = _args(
        node,
        ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
        {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
    )
    x = a["input"]
    if look.tensor_inputs([a["weight"], a["bias"]]):
        return None  # a kernel computed from the input (dynamic convolution)
    inputs = look.tensor_inputs([x])
    w, b = look(a["weight"]), look(a["bias"])
    names = [n.target for n in (a["weight"], a["bias"]) if isinstance(n, fx.Node) and n.op == "get_attr"]
    return _conv_step(node, values, inputs, x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"], nd, names)


def _linear_function_step(node: fx.Node, values, look: _Lookup) -> Step | None:
    """``F.linear`` with a constant weight."""
    a = _args(node, ["input", "weight", "bias"], {"bias": None})
    if look.tensor_inputs([a["weight"], a["bias"]]):
        return None
    x, w, b = a["input"], look(a["weight"]), look(a["bias"])
    own = w.numel() + (b.numel() if isinstance(b, torch.Tensor) else 0)
    return Step(
        look.tensor_inputs([x]),
        lambda rep: _resolve(rep, values, x, "linear").then_linear(w, b),
        "Linear",
        True,
        own_params=own,
    )


def _bn_function_step(node: fx.Node, values, look: _Lookup) -> Step | None:
    """``F.batch_norm`` on constant running statistics (a subclass traced through: timm's BatchNormAct2d)."""
    a = _args(
        node,
        ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
    )
    x = a["input"]
    params = [a["running_mean"], a["running_var"], a["weight"], a["bias"]]
    if look.tensor_inputs(params):
        return None
    inputs = look.tensor_inputs([x])
    names = [n.target.rsplit(".", 1)[0] for n in params if isinstance(n, fx.Node) and n.op == "get_attr"][:1]
    if a["training"] or a["running_mean"] is None:
        return Step(inputs, None, "BatchNorm", False, "BatchNorm with batch statistics (train mode)", names)
    mean, var = look(a["running_mean"]), look(a["running_var"])
    return _bn_step(inputs, values, x, mean, var, look(a["weight"]), look(a["bias"]), float(a["eps"]), names)


def _avg_function_step(node: fx.Node, values, look: _Lookup, nd: int) -> Step | None:
    """``F.avg_pool{1,2,3}d``."""
    a = _args(
        node,
        ["input", *_AVG_SETTINGS],
        {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None},
    )
    return _avg_step(look.tensor_inputs([a["input"]]), values, a["input"], a, nd, [])


_RESHAPES = {"reshape", "view", "flatten", "reshape_as", "view_as", torch.reshape, torch.flatten}


def _reshape_step(node: fx.Node, values, look: _Lookup) -> Step | None:
    """A reshape that keeps the last dimension (LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``): a map
    acting on the last dimension alone (the linear layout) commutes with it; anything else stops."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node):
        return None
    before, after = _shape(values, x), _shape(values, node)
    if before is None or after is None or len(before) < 2 or len(after) < 2 or before[-1] != after[-1]:
        return None

    def apply(rep):
        if rep is ROOT:
            raise NotOneLayer("a reshape of the region's input: the region starts after it")
        if rep.layout != "linear":
            raise NotOneLayer("a reshape of a channel-first map")
        return rep

    return Step(look.tensor_inputs([x]), apply, "identity")


def _method_step(node: fx.Node, values, look: _Lookup) -> Step | None:
    t = node.target
    if t in _RESHAPES:
        return _reshape_step(node, values, look)
    for op, names in (("add", _ADD), ("sub", _SUB), ("mul", _MUL), ("div", _DIV)):
        if t in names:
            return _arith_step(node, values, look, op)
    if t in _NEG or t in _PASS_METHODS:
        if len(node.args) != 1 or node.kwargs:
            return None
        (x,) = node.args
        if t in _PASS_METHODS:
            return Step(look.tensor_inputs([x]), _same, t)
        return Step(
            look.tensor_inputs([x]),
            lambda rep: _resolve(rep, values, x, _default_layout(values, x)).scale_shift(-1.0, None),
            t,
        )
    return None


def _in_place(node: fx.Node) -> bool:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    return node.op in ("call_method", "call_function") and (
        name.endswith("_") and not name.endswith("__") or name.startswith("i") and t in vars(operator).values()
    )


def linear_step(node: fx.Node, gm: fx.GraphModule, values, is_const) -> Step | None:
    """The :class:`Step` of ``node`` if it is linear in its tensor inputs, else ``None``."""
    look = _Lookup(values, is_const)
    if not isinstance(values.get(node), torch.Tensor) or values[node].is_complex():
        return None
    if _in_place(node):
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node) or len(first.users) != 1:
            return None  # the mutated tensor is read elsewhere too
    if node.op == "call_module":
        step = _module_step(node, gm, values, look)
    elif node.op == "call_function":
        step = _function_step(node, values, look)
    elif node.op == "call_method":
        step = _method_step(node, values, look)
    else:
        step = None
    if step is not None and (not step.inputs or len(step.inputs) > 2):
        return None
    return step


def is_random(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _RANDOM


def numel(t) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0
