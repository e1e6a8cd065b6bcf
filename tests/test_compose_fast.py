"""The training-time composition (pairwise Toom-Cook) against the exact direct algebra.

Float32 kernels must stay within 1e-5 relative (max-abs error over max-abs value) of a float64
reference on every chain generated here: the CK chains of kernels 2..7 in 1, 2 and 3 dimensions,
with groups, depthwise and the paper's widths, plus uneven tap shapes. Gradients are checked with
gradcheck in float64 and against the direct path in float32.
"""

import itertools

import pytest
import torch
import torch.nn as nn

import expandctl
from expandctl import algebra
from expandctl.layers import ExpandedConvCK

KERNEL_TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def ck_chain(kernel, c_in, c_out, rate, groups, dtype=torch.float64):
    """Factor weights of a CK chain (kaiming-like scale, as nn.Conv initialises them)."""
    steps = algebra.kernel_steps(kernel)
    first = algebra.hidden_width(c_in, rate, groups)
    rest = algebra.hidden_width(c_out, rate, groups)
    widths = [c_in, first] + [rest] * (len(steps) - 2) + [c_out]
    weights = []
    for j, k in enumerate(steps):
        fan_in = widths[j] // groups * torch.Size(k).numel()
        weights.append(torch.randn(widths[j + 1], widths[j] // groups, *k, dtype=dtype) / fan_in**0.5)
    return weights


def chain_cases():
    for dims, sizes in ((1, range(4, 8)), (2, range(4, 8)), (3, range(4, 6))):
        for k, (c_in, c_out, groups) in itertools.product(sizes, [(3, 8, 1), (6, 4, 2), (4, 4, 4)]):
            yield (k,) * dims, c_in, c_out, 4 if dims < 3 else 2, groups
    yield (7, 7), 16, 32, 4, 1  # paper SmallNet's last layer
    yield (7, 7), 64, 128, 4, 1  # the wide network's last layer: 64 -> 256 -> 512 -> 128
    yield (7, 5), 8, 8, 1.5, 1
    yield (3, 7), 5, 6, 2, 1
    yield (7, 7, 7), 2, 2, 2, 1


@pytest.mark.parametrize("case", list(chain_cases()), ids=str)
def test_toom_float32_kernel_within_tolerance(case):
    kernel, c_in, c_out, rate, groups = case
    weights = ck_chain(kernel, c_in, c_out, rate, groups)
    reference, _ = algebra.compose_chain(weights, None, groups)
    fast = algebra.compose_toom([w.float() for w in weights], groups)
    assert fast.shape == reference.shape == (c_out, c_in // groups, *kernel)
    assert fast.dtype == torch.float32
    assert rel(fast, reference) <= KERNEL_TOL
    # In float64 the transforms are exact to rounding: any bracketing or layout bug shows here.
    assert rel(algebra.compose_toom(weights, groups), reference) <= 1e-11


@pytest.mark.parametrize(
    "shapes,groups",
    [
        ([(4, 2, 3, 3), (6, 4, 3, 3), (3, 6, 3, 3)], 1),
        ([(4, 2, 3), (4, 2, 3), (4, 2, 2), (2, 2, 1)], 2),
        ([(4, 3, 1, 3), (4, 4, 3, 3), (5, 4, 3, 1)], 1),
        ([(2, 1, 3, 3, 1), (2, 2, 3, 1, 3)], 1),
    ],
)
def test_toom_gradcheck(shapes, groups):
    weights = tuple(torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes)
    torch.autograd.gradcheck(lambda *w: algebra.compose_toom(w, groups), weights)


@pytest.mark.parametrize("kernel,c_in,c_out,groups", [((7, 7), 16, 32, 1), ((5, 5), 8, 8, 2), ((7,), 3, 5, 1)])
def test_toom_float32_gradients_match_direct(kernel, c_in, c_out, groups):
    weights = [w.float().requires_grad_() for w in ck_chain(kernel, c_in, c_out, 4, groups)]
    upstream = torch.randn(c_out, c_in // groups, *kernel)
    direct = torch.autograd.grad(algebra.compose_chain(weights, None, groups)[0], weights, upstream)
    fast = torch.autograd.grad(algebra.compose_toom(weights, groups), weights, upstream)
    for d, f in zip(direct, fast):
        assert f.shape == d.shape
        assert rel(f, d) <= 1e-5


def test_every_toom_bracketing_gives_the_same_kernel():
    shapes = [(4, 3, 3), (5, 4, 3), (6, 5, 2), (2, 6, 1)]  # four factors: five bracketings
    weights = [torch.randn(s, dtype=torch.float64) for s in shapes]
    reference, _ = algebra.compose_chain(weights)
    trees = list(algebra.toom._bracketings(0, len(weights) - 1))
    assert len(trees) == 5
    for tree in trees:
        assert rel(algebra.compose_toom(weights, 1, tree), reference) <= 1e-11


def test_composition_method_cost_model():
    def ck(kernel, c_in, c_out, groups=1, dtype=torch.float32):
        return tuple(tuple(w.shape) for w in ck_chain(kernel, c_in, c_out, 4, groups)), dtype

    assert algebra.composition_method(*ck((7, 7), 64, 128)) == "toom"  # 1.6 GMAC direct, ~3x fewer
    assert algebra.composition_method(*ck((7, 7), 32, 64)) == "toom"  # 203M MACs direct
    assert algebra.composition_method(*ck((7, 7), 16, 32)) == "direct"  # 25M: too small to pay
    assert algebra.composition_method(*ck((7, 7), 3, 8)) == "direct"
    assert algebra.composition_method(*ck((7, 7), 3, 32)) == "direct"  # 3 -> 12 -> 128 -> 32: gain 1.57
    assert algebra.composition_method(*ck((7, 7), 8, 16)) == "direct"  # 3.2M MACs, gain ~2
    assert algebra.composition_method(*ck((7, 7), 64, 64, groups=64)) == "direct"  # depthwise
    assert algebra.composition_method(*ck((9, 9), 64, 128)) == "direct"  # float32 interpolation error
    with pytest.raises(ValueError, match="at most 7 taps"):
        algebra.compose_toom(ck_chain((9,), 2, 2, 1, 1))
    assert algebra.composition_method(*ck((7, 7), 64, 128, dtype=torch.bfloat16)) == "direct"
    cl = ((256, 64, 1, 1), (512, 256, 7, 7), (128, 512, 1, 1))
    assert algebra.composition_method(cl, torch.float32) == "direct"  # CL: already one product per tap


def test_compose_chain_fast_biases_and_methods():
    weights = ck_chain((7, 7), 4, 6, 2, 1)
    biases = [torch.randn(w.shape[0], dtype=torch.float64) for w in weights]
    ref_w, ref_b = algebra.compose_chain(weights, biases)
    for method in ("direct", "toom", "auto"):
        w, b = algebra.compose_chain_fast(weights, biases, 1, None, method)
        assert rel(w, ref_w) <= 1e-11 and rel(b, ref_b) <= 1e-12
    with pytest.raises(ValueError, match="unknown composition method"):
        algebra.compose_chain_fast(weights, biases, 1, None, "fft")


def test_layer_trains_with_toom_and_contracts_exactly():
    conv = nn.Conv2d(6, 8, 7, padding=3, bias=True)
    layer = ExpandedConvCK.from_module(conv, ExpandedConvCK.hidden_for(conv, 4))
    x = torch.randn(2, 6, 9, 9)
    outputs, grads = {}, {}
    for method in ("direct", "toom"):
        layer.composition = method
        layer.zero_grad()
        out = layer(x)
        out.square().sum().backward()
        outputs[method] = out.detach()
        grads[method] = [f.weight.grad.clone() for f in layer.factors]
    assert rel(outputs["toom"], outputs["direct"]) <= 1e-5
    for a, b in zip(grads["toom"], grads["direct"]):
        assert rel(a, b) <= 1e-4
    # Contraction never uses Toom-Cook: bit-identical to the direct algebra.
    with torch.no_grad():
        direct, _ = algebra.compose_chain([f.weight for f in layer.factors], [f.bias for f in layer.factors], 1)
    assert torch.equal(expandctl.contract(layer).weight, direct)


def _saved_bytes(fn, weights) -> int:
    """Bytes autograd keeps for the backward of ``fn(weights)``, the factors themselves excluded."""
    own = {w.untyped_storage().data_ptr() for w in weights}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(weights)
    return total


def test_toom_saves_no_more_than_the_direct_path_unless_asked():
    weights = [w.float().requires_grad_() for w in ck_chain((7, 7), 16, 32, 4, 1)]
    direct = _saved_bytes(lambda w: algebra.compose_chain(w)[0], weights)
    lean = _saved_bytes(lambda w: algebra.compose_toom(w), weights)
    keep = _saved_bytes(lambda w: algebra.compose_toom(w, keep_operands=True), weights)
    assert 0 < lean <= direct < keep
    upstream = torch.randn(32, 16, 7, 7)
    g_lean = torch.autograd.grad(algebra.compose_toom(weights), weights, upstream)
    g_keep = torch.autograd.grad(algebra.compose_toom(weights, keep_operands=True), weights, upstream)
    for a, b in zip(g_lean, g_keep):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
