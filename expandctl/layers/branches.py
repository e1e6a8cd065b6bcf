"""Parallel-branch re-parameterisations of any ``ConvNd``: ``acb``, ``rep``, ``dbb``, ``orepa``.

During training a convolution is replaced by several branches run on the same input and summed;
after training they merge into one kernel (:mod:`expandctl.algebra.branch`):

* ``acb`` -- ACNet (Ding et al., ICCV 2019): the kxk kernel plus one line kernel along every axis
  (1xk and kx1 in 2D), each followed by a BatchNorm.
* ``rep`` -- RepVGG (Ding et al., CVPR 2021): kxk + BN, 1x1 + BN and, where the layer keeps its
  input's channels and size, an identity + BN.
* ``dbb`` -- Diverse Branch Block (Ding et al., CVPR 2021): kxk + BN; 1x1 + BN; 1x1 -> BN ->
  average pooling -> BN; 1x1 -> BN -> kxk -> BN. ``--rate`` sets the width of the last branch's
  hidden layer (rate 1: the input's width, DBB's default).
* ``orepa`` -- OREPA's linear form (Hu et al., CVPR 2022): DBB's branches with a learnable
  per-channel scale instead of each BatchNorm, one BatchNorm after the sum; the kernel is composed
  every step and one convolution runs.

Every branch reads the layer's input padded once, with the layer's own mode and amount; a small
kernel reads the crop that its position inside kxk covers. A per-pixel stage before a spatial one
(DBB's 1x1 -> BN) pads its output with what it maps a zero pixel to ("BNAndPad"), so each branch
is exact at image borders, for any kernel size (odd, even, non-square), stride, dilation, groups
and padding mode. The branch BatchNorms train with batch statistics: then the layer runs its
branches; in eval mode it runs one convolution with the merged kernel, like contraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import algebra
from ..errors import UsageError
from ..kinds import KINDS
from .base import ExpandedLayer, check_modes, register_expansion, template_of
from .conv import CONV_FN, CONV_TYPES, conv_reason, input_padding
from .hosts import fused_only_reason

__all__ = ["BranchedConv", "ACBConv", "RepConv", "DBBConv", "OREPAConv", "BranchSpec"]

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@dataclass(frozen=True)
class BranchSpec:
    """One branch: an optional 1x1 ``pre`` conv to ``pre`` channels (with a BatchNorm after it if
    ``pre_norm``), then a spatial stage -- ``"conv"`` (a kernel of ``kernel`` taps at ``offset``
    inside the layer's kernel), ``"identity"`` or ``"avg"`` (average pooling over the layer's
    kernel) -- then the kind's per-channel affine."""

    name: str
    spatial: str
    kernel: tuple[int, ...]
    offset: tuple[int, ...]
    pre: int | None = None
    pre_norm: bool = False

    def describe(self, norm: str) -> str:
        k = "x".join(map(str, self.kernel))
        stage = {"conv": k, "identity": "identity", "avg": f"avg {k}"}[self.spatial]
        if self.pre is not None:
            stage = f"1x1 ->{self.pre}" + (" -> BN" if self.pre_norm else "") + f" -> {stage}"
        return f"{stage} {'+BN' if norm == 'bn' else '*s'}"


class Branch(nn.Module):
    """The modules of one :class:`BranchSpec` (parameters only; the layer runs it)."""

    def __init__(self, spec: BranchSpec, conv: nn.Module, like: torch.Tensor, norm: str, init_scale: float):
        super().__init__()
        dims = len(conv.kernel_size)
        kw = {"device": like.device, "dtype": like.dtype}
        conv_t, g = CONV_TYPES[dims], conv.groups
        c_in, c_out = conv.in_channels, conv.out_channels
        self.pre = self.pre_norm = self.conv = self.norm = self.scale = None
        if spec.pre is not None:
            self.pre = conv_t(c_in, spec.pre, 1, groups=g, bias=False, **kw)
            if spec.pre_norm:
                self.pre_norm = _BN[dims](spec.pre, **kw)
            c_in = spec.pre
        if spec.spatial == "conv":
            dilation = tuple(d if k > 1 else 1 for d, k in zip(conv.dilation, spec.kernel))
            self.conv = conv_t(
                c_in, c_out, spec.kernel, stride=conv.stride, dilation=dilation, groups=g, bias=False, **kw
            )
        if norm == "bn":
            self.norm = _BN[dims](c_out, **kw)
        else:
            self.scale = nn.Parameter(torch.full((c_out,), float(init_scale), **kw))


def _norm_fill(bn: nn.modules.batchnorm._BatchNorm, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(BN(y), BN(0))``: the normalised map and the value a zero pixel maps to, with the statistics
    this forward uses (the batch's while training, the running ones in eval mode)."""
    out = bn(y)
    if bn.training or bn.running_mean is None:
        var, mean = torch.var_mean(y, [0, *range(2, y.dim())], unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return out, algebra.bn_affine(mean, var, bn.eps, bn.weight, bn.bias)[1]


def _bn_eval(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` of a BatchNorm with its running statistics (what contraction folds)."""
    if bn.running_mean is None:
        raise UsageError("a branch BatchNorm without running statistics cannot be merged")
    return algebra.bn_affine(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


def _view(v: torch.Tensor, dims: int) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * dims))


class BranchedConv(ExpandedLayer):
    """Shared machinery of the parallel-branch kinds on ``Conv1d/2d/3d``: build, run, merge."""

    source_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    priority = 0
    #: The per-branch affine: ``"bn"`` (a BatchNorm per branch) or ``"scale"`` (OREPA).
    norm: ClassVar[str] = "bn"
    trains_on_equivalent = False
    default_rate = None
    #: Initial value of the per-channel scale of the kxk branch and of the others (``norm="scale"``).
    init_scales: ClassVar[tuple[float, float]] = (1.0, 1.0)

    def __init__(
        self, template: nn.Module, specs: list[BranchSpec], hidden: list[int], forward: str, like: torch.Tensor
    ):
        super().__init__(template, forward)
        t = template
        self.stride, self.dilation, self.groups = t.stride, t.dilation, t.groups
        self.padding, self.padding_mode = t.padding, t.padding_mode
        self._pad = input_padding(t)
        self.hidden = list(hidden)
        self.specs = list(specs)
        self.branches = nn.ModuleDict(
            {s.name: Branch(s, t, like, self.norm, self.init_scales[0 if s.name == "main" else 1]) for s in specs}
        )

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def branch_specs(cls, module: nn.Module, hidden: list[int]) -> list[BranchSpec]:
        raise NotImplementedError

    @classmethod
    def _own_reason(cls, module: nn.Module, pointwise: bool) -> str | None:
        """This kind's refusal of a plain conv (the kernel or shape has no such branches)."""
        return None

    @classmethod
    def accepts(cls, module, pointwise=False):
        reason = conv_reason(module, cls.source_types)
        if reason is None and fused_only_reason(module) is not None:
            reason = (
                f"{type(module).__name__} overrides torch's forward; the branch strategies need a plain "
                "Conv1d/2d/3d (their branches run on the activations while training)"
            )
        return reason or cls._own_reason(module, pointwise)

    @classmethod
    def hidden_for(cls, module, rate):
        return []

    @classmethod
    def describe(cls, module, hidden):
        specs = cls.branch_specs(module, list(hidden))
        g, m, n = module.groups, module.in_channels, module.out_channels
        total = 0
        for s in specs:
            c = m
            if s.pre is not None:
                total += s.pre * (m // g) + (2 * s.pre if s.pre_norm else 0)
                c = s.pre
            if s.spatial == "conv":
                total += n * (c // g) * math.prod(s.kernel)
            total += 2 * n if cls.norm == "bn" else n
        total += cls._extra_params(module)
        descs = [s.describe(cls.norm) for s in specs] + cls._extra_descs()
        g_note = f" g{g}" if g > 1 else ""
        return [d + g_note if i == 0 else d for i, d in enumerate(descs)], total

    @classmethod
    def _extra_params(cls, module) -> int:
        return 0

    @classmethod
    def _extra_descs(cls) -> list[str]:
        return []

    @classmethod
    def from_module(cls, module, hidden, init="scratch", forward="fused"):
        check_modes(init, forward)
        hidden = list(hidden)
        layer = cls(template_of(module), cls.branch_specs(module, hidden), hidden, forward, module.weight)
        #: Whether the replaced conv had a bias: if not, contraction's shift can move into a following
        #: BatchNorm (:func:`expandctl.fold.absorb_shifts`), leaving the compact model's structure.
        layer.source_bias = module.bias is not None
        if init == "preserve":
            layer._preserve(module)
        return layer.train(module.training)

    @torch.no_grad()
    def _preserve(self, module: nn.Module) -> None:
        """The kxk branch takes the layer's kernel; every other branch's affine starts at zero; the
        BatchNorms' running statistics at (0, 1) make eval mode compute the layer exactly."""
        main = self.branches["main"]
        main.conv.weight.copy_(module.weight)
        for name, b in self.branches.items():
            if b.norm is not None:
                if name == "main":
                    b.norm.weight.fill_(math.sqrt(1 + b.norm.eps))
                    b.norm.bias.copy_(module.bias if module.bias is not None else torch.zeros_like(b.norm.bias))
                else:
                    b.norm.weight.zero_()
                    b.norm.bias.zero_()
            else:
                b.scale.fill_(1.0 if name == "main" else 0.0)
        self._preserve_rest(module)

    def _preserve_rest(self, module: nn.Module) -> None:
        pass

    # --- running the branches -------------------------------------------------------------------
    def _pad_map(self, y: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
        if not any(self._pad):
            return y
        if self.padding_mode != "zeros":
            return F.pad(y, self._pad, mode=self.padding_mode)
        if fill is None:
            return F.pad(y, self._pad)
        f = _view(fill, y.dim() - 2)
        return F.pad(y - f, self._pad) + f

    def _crop(self, y: torch.Tensor, spec: BranchSpec) -> torch.Tensor:
        K = self._template.kernel_size
        for i, (k, o, d) in enumerate(zip(spec.kernel, spec.offset, self.dilation)):
            start, stop = o * d, y.shape[2 + i] - (K[i] - k - o) * d
            if start or stop != y.shape[2 + i]:
                y = y.narrow(2 + i, start, stop - start)
        return y

    def _run_branch(self, x: torch.Tensor, spec: BranchSpec, b: Branch) -> torch.Tensor:
        y, fill = x, None
        if b.pre is not None:
            y = b.pre(y)
            if b.pre_norm is not None:
                y, fill = _norm_fill(b.pre_norm, y)
        y = self._crop(self._pad_map(y, fill), spec)
        dims = y.dim() - 2
        if spec.spatial == "conv":
            y = b.conv(y)
        elif spec.spatial == "avg":
            K = self._template.kernel_size
            # As a depthwise conv with a constant kernel: on CPU it runs 3-5x faster than avg_pool.
            c = y.shape[1]
            kernel = algebra.average_kernel(c, c, K, y)
            y = CONV_FN[dims](y, kernel, None, self.stride, 0, self.dilation, c)
        # "identity": the crop at the identity tap is the input itself (stride 1, same size).
        if b.norm is not None:
            return b.norm(y)
        return y * _view(b.scale, dims)

    def _branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for spec in self.specs:
            y = self._run_branch(x, spec, self.branches[spec.name])
            out = y if out is None else out + y
        return out

    def _explicit(self, x):
        return self._branch_sum(x)

    def _single(self, x, weight, bias):
        conv = CONV_FN[len(self.stride)]
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            # "same" with an even kernel: pad as torch would (odd extra on the right), once, here.
            x = self._pad_map(x, None)
            return conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    # --- merging ----------------------------------------------------------------------------------
    def _branch_kernel(self, spec: BranchSpec, b: Branch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(w, b)`` of one branch on the padded input, at the layer's kernel size."""
        t = self._template
        K, g, like = tuple(t.kernel_size), self.groups, next(self.parameters())
        weights, biases = [], []
        if b.pre is not None:
            w, bias = b.pre.weight, None
            if b.pre_norm is not None:
                w, bias = algebra.apply_affine(w, None, *_bn_eval(b.pre_norm))
            weights.append(w)
            biases.append(bias)
        channels = weights[-1].shape[0] if weights else t.in_channels
        if spec.spatial == "avg" and weights:
            w, bias = algebra.average_after(weights[0], biases[0], K)
            return algebra.apply_affine(w, bias, *(_bn_eval(b.norm) if b.norm is not None else (b.scale,)))
        if spec.spatial == "conv":
            kernel = b.conv.weight
        elif spec.spatial == "identity":
            kernel = algebra.identity_kernel(channels, g, K, spec.offset, like)
        else:
            kernel = algebra.average_kernel(channels, g, K, like)
        weights.append(kernel)
        biases.append(None)
        w, bias = algebra.compose_chain(weights, biases, g)  # all biases None: bias None
        if spec.spatial == "conv":
            w = algebra.embed_kernel(w, K, spec.offset)
        if b.norm is not None:
            return algebra.apply_affine(w, bias, *_bn_eval(b.norm))
        return algebra.apply_affine(w, bias, b.scale)

    def _linear_sum(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return algebra.sum_branches([self._branch_kernel(s, self.branches[s.name]) for s in self.specs])

    def _compose(self, fast: bool = False):
        return self._linear_sum()

    def config(self) -> dict:
        return {"kind": self.kind, "hidden": list(self.hidden)}

    def extra_repr(self):
        descs = [s.describe(self.norm) for s in self.specs]
        return f"{self.kind} [{', '.join(descs)}], groups={self.groups}, forward={self.forward_mode}"


def _pointwise_reason(module: nn.Module, pointwise: bool) -> str | None:
    if max(module.kernel_size) == 1:
        return "1x1 convolution: these branches need a larger kernel"
    return None


def _pure_depthwise(module: nn.Module) -> bool:
    return module.groups == module.in_channels == module.out_channels


@register_expansion
class ACBConv(BranchedConv):
    """ACNet: kxk + BN and one line kernel + BN along each axis of the kernel larger than 1."""

    kind = "acb"
    summary, default_rate = KINDS[kind].summary, KINDS[kind].default_rate

    @classmethod
    def _own_reason(cls, module, pointwise):
        if sum(1 for k in module.kernel_size if k > 1) < 2:
            k = "x".join(map(str, module.kernel_size))
            return f"kernel {k}: ACNet's asymmetric branches need a kernel larger than 1 in at least two dimensions"
        return None

    @classmethod
    def branch_specs(cls, module, hidden):
        K = tuple(module.kernel_size)
        specs = [BranchSpec("main", "conv", K, (0,) * len(K))]
        names = {2: ("ver", "hor"), 3: ("depth", "ver", "hor")}[len(K)]
        for i, k in enumerate(K):
            if k > 1:
                line = tuple(k if j == i else 1 for j in range(len(K)))
                specs.append(BranchSpec(names[i], "conv", line, algebra.centre_offset(line, K)))
        return specs


@register_expansion
class RepConv(BranchedConv):
    """RepVGG: kxk + BN, 1x1 + BN (for k > 1), identity + BN (where the layer keeps its input)."""

    kind = "rep"
    summary, default_rate = KINDS[kind].summary, KINDS[kind].default_rate

    @classmethod
    def _identity_tap(cls, module):
        if module.in_channels != module.out_channels:
            return None
        return algebra.identity_tap(module.kernel_size, module.dilation, input_padding(module), module.stride)

    @classmethod
    def _own_reason(cls, module, pointwise):
        if max(module.kernel_size) == 1:
            if not pointwise:
                return "1x1 convolution (pass pointwise=True / --pointwise to add its identity branch)"
            if cls._identity_tap(module) is None:
                return "1x1 convolution without an identity (input and output differ in channels or size)"
        return None

    @classmethod
    def branch_specs(cls, module, hidden):
        K = tuple(module.kernel_size)
        ones = (1,) * len(K)
        specs = [BranchSpec("main", "conv", K, (0,) * len(K))]
        if K != ones:
            specs.append(BranchSpec("pw", "conv", ones, algebra.centre_offset(ones, K)))
        tap = cls._identity_tap(module)
        if tap is not None:
            specs.append(BranchSpec("identity", "identity", ones, tap))
        return specs


@register_expansion
class DBBConv(BranchedConv):
    """Diverse Branch Block: kxk + BN; 1x1 + BN; 1x1 -> BN -> avg -> BN; 1x1 -> BN -> kxk -> BN.

    A depthwise layer (groups == in == out) has no 1x1 branch and pools its input directly, as in
    DBB; ``--rate`` sets the hidden width of the 1x1 -> kxk branch (default 1: the input's width)."""

    kind = "dbb"
    summary, default_rate = KINDS[kind].summary, KINDS[kind].default_rate

    @classmethod
    def _own_reason(cls, module, pointwise):
        return _pointwise_reason(module, pointwise)

    @classmethod
    def hidden_for(cls, module, rate):
        rate = cls.default_rate if rate is None else rate
        return [algebra.hidden_width(module.in_channels, rate, module.groups)]

    @classmethod
    def branch_specs(cls, module, hidden):
        if len(hidden) != 1:
            raise UsageError(f"a {cls.kind} layer has one hidden width, not {len(hidden)}")
        K = tuple(module.kernel_size)
        ones, zeros = (1,) * len(K), (0,) * len(K)
        norm = cls.norm == "bn"
        specs = [BranchSpec("main", "conv", K, zeros)]
        dw = _pure_depthwise(module)
        if not dw:
            specs.append(BranchSpec("pw", "conv", ones, algebra.centre_offset(ones, K)))
        pre = None if dw else module.out_channels
        specs.append(BranchSpec("avg", "avg", K, zeros, pre=pre, pre_norm=norm and pre is not None))
        specs.append(BranchSpec("pw_kxk", "conv", K, zeros, pre=hidden[0], pre_norm=norm))
        return specs


@register_expansion
class OREPAConv(DBBConv):
    """OREPA's linear form: DBB's branches with a learnable per-channel scale each instead of their
    BatchNorms, one BatchNorm after the sum. The block is linear up to that BatchNorm, so training
    composes the kernel every step and runs one convolution and the BatchNorm; contraction folds it.
    Scales start at 1 for the kxk branch and 0.5 for the others."""

    kind = "orepa"
    summary, default_rate = KINDS[kind].summary, KINDS[kind].default_rate
    norm = "scale"
    init_scales = (1.0, 0.5)

    def __init__(self, template, specs, hidden, forward, like):
        super().__init__(template, specs, hidden, forward, like)
        self.bn = _BN[len(template.kernel_size)](template.out_channels, device=like.device, dtype=like.dtype)

    @classmethod
    def _extra_params(cls, module) -> int:
        return 2 * module.out_channels

    @classmethod
    def _extra_descs(cls) -> list[str]:
        return ["sum -> BN"]

    def _train_forward(self, x):
        if self.forward_mode == "fused":
            return self.bn(self._single(x, *self._linear_sum()))
        return self.bn(self._branch_sum(x))

    def _explicit(self, x):
        return self.bn(self._branch_sum(x))

    def _compose(self, fast: bool = False):
        weight, bias = self._linear_sum()
        return algebra.apply_affine(weight, bias, *_bn_eval(self.bn))

    @torch.no_grad()
    def _preserve_rest(self, module):
        self.bn.weight.fill_(math.sqrt(1 + self.bn.eps))
        self.bn.bias.copy_(module.bias if module.bias is not None else torch.zeros_like(self.bn.bias))

    def extra_repr(self):
        return super().extra_repr().replace("]", ", sum -> BN]", 1)
