"""The pure tensor functions, each checked against running the layers one after the other."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from expandctl import algebra

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def run_chain(x, weights, biases, groups):
    for w, b in zip(weights, biases):
        x = CONV[w.dim() - 2](x, w, b, groups=groups)
    return x


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("ka,kb", [(3, 3), (1, 3), (3, 1), (1, 1), (2, 3)])
def test_compose_pair_equals_two_convolutions(dims, groups, ka, kb):
    a = torch.randn(12, 6 // groups, *([ka] * dims), dtype=torch.float64)
    b = torch.randn(18, 12 // groups, *([kb] * dims), dtype=torch.float64)
    x = torch.randn(2, 6, *([7] * dims), dtype=torch.float64)
    k = algebra.compose_pair(a, b, groups)
    assert k.shape == (18, 6 // groups, *([ka + kb - 1] * dims))
    expected = run_chain(x, [a, b], [None, None], groups)
    torch.testing.assert_close(CONV[dims](x, k, groups=groups), expected, rtol=1e-12, atol=1e-12)


def test_compose_pair_non_square_kernels():
    a = torch.randn(5, 4, 3, 1, dtype=torch.float64)
    b = torch.randn(7, 5, 2, 3, dtype=torch.float64)
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64)
    k = algebra.compose_pair(a, b)
    assert k.shape == (7, 4, 4, 3)
    torch.testing.assert_close(F.conv2d(x, k), F.conv2d(F.conv2d(x, a), b), rtol=1e-12, atol=1e-12)


def test_compose_pair_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="channel mismatch"):
        algebra.compose_pair(torch.randn(4, 3, 3, 3), torch.randn(5, 3, 3, 3))


@pytest.mark.parametrize("groups", [1, 3])
def test_compose_chain_with_biases_equals_chain(groups):
    shapes = [(6, 3 // groups * 1, 1, 1), (12, 6 // groups, 3, 3), (9, 12 // groups, 3, 3), (3, 9 // groups, 1, 1)]
    shapes[0] = (6, 3 // groups, 1, 1)
    weights = [torch.randn(s, dtype=torch.float64) for s in shapes]
    biases = [torch.randn(s[0], dtype=torch.float64) for s in shapes]
    x = torch.randn(2, 3, 10, 11, dtype=torch.float64)
    w, b = algebra.compose_chain(weights, biases, groups)
    torch.testing.assert_close(
        F.conv2d(x, w, b, groups=groups), run_chain(x, weights, biases, groups), rtol=1e-12, atol=1e-12
    )


def test_every_bracketing_gives_the_same_kernel():
    weights = [
        torch.randn(s, dtype=torch.float64) for s in [(8, 3, 3, 3), (16, 8, 3, 3), (16, 16, 3, 3), (4, 16, 3, 3)]
    ]
    orders = [(((0, 1), 2), 3), ((0, (1, 2)), 3), (0, ((1, 2), 3)), ((0, 1), (2, 3)), (0, (1, (2, 3)))]
    results = [algebra.compose_chain(weights, None, 1, order)[0] for order in orders]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-12, atol=1e-12)


def test_linear_chain():
    w1, w2, w3 = (torch.randn(s, dtype=torch.float64) for s in [(20, 5), (28, 20), (7, 28)])
    b1, b2, b3 = (torch.randn(n, dtype=torch.float64) for n in (20, 28, 7))
    w, b = algebra.compose_chain([w1, w2, w3], [b1, b2, b3])
    torch.testing.assert_close(w, w3 @ w2 @ w1)
    torch.testing.assert_close(b, w3 @ (w2 @ b1 + b2) + b3)


def test_chain_order_folds_narrow_side_first():
    # CL chain 1x1 (3->12), 7x7 (12->256), 1x1 (256->64): composing (mid, first) first is far cheaper.
    shapes = ((12, 3, 1, 1), (256, 12, 7, 7), (64, 256, 1, 1))
    order = algebra.chain_order(shapes)
    assert order == ((0, 1), 2)
    cost = lambda o: _cost(o, shapes)[0]
    assert cost(order) <= min(cost(((0, 1), 2)), cost((0, (1, 2))))
    # and the mirror image prefers the other bracketing
    mirrored = ((256, 64, 1, 1), (12, 256, 7, 7), (3, 12, 1, 1))
    assert algebra.chain_order(mirrored) == (0, (1, 2))


def _cost(order, shapes):
    if isinstance(order, int):
        return 0, shapes[order]
    (cl, sl), (cr, sr) = _cost(order[0], shapes), _cost(order[1], shapes)
    out = (sr[0], sl[1], *(a + b - 1 for a, b in zip(sl[2:], sr[2:])))
    return cl + cr + algebra.composition_cost(sl, sr), out


@pytest.mark.parametrize(
    "kernel,expected",
    [
        ((7,), [(3,), (3,), (3,)]),
        ((5, 5), [(3, 3), (3, 3)]),
        ((4,), [(3,), (2,)]),
        ((6, 6), [(3, 3), (3, 3), (2, 2)]),
        ((1, 7), [(1, 3), (1, 3), (1, 3)]),
        ((5, 7), [(3, 3), (3, 3), (1, 3)]),
        ((9, 9, 9), [(3, 3, 3)] * 4),
    ],
)
def test_kernel_steps(kernel, expected):
    steps = algebra.kernel_steps(kernel)
    assert steps == expected
    for d, k in enumerate(kernel):
        assert sum(s[d] for s in steps) - (len(steps) - 1) == k


def test_kernel_steps_compose_to_the_right_size():
    for kernel in itertools.product(range(1, 10), repeat=2):
        weights = [torch.zeros(1, 1, *s) for s in algebra.kernel_steps(kernel)]
        assert algebra.compose_chain(weights)[0].shape[2:] == kernel


def test_flip_transpose_reverses_composition():
    a = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(6, 4, 2, 3, dtype=torch.float64)
    g = 2
    lhs = algebra.flip_transpose(algebra.compose_pair(a, b, g), g)
    rhs = algebra.compose_pair(algebra.flip_transpose(b, g), algebra.flip_transpose(a, g), g)
    torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize(
    "c,rate,groups,expected", [(3, 4, 1, 12), (10, 1.5, 1, 15), (7, 1.5, 1, 11), (6, 2, 4, 12), (32, 4, 32, 128)]
)
def test_hidden_width(c, rate, groups, expected):
    assert algebra.hidden_width(c, rate, groups) == expected


def test_compose_is_differentiable():
    weights = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(4, 2, 3), (5, 4, 3)]]
    torch.autograd.gradcheck(lambda a, b: algebra.compose_pair(a, b), tuple(weights))
