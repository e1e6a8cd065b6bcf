"""fit_chain: least-squares fit of a chain of small kernels to one large kernel (CK "preserve" init)."""

import pytest
import torch
import torch.nn.functional as F

from expandctl.algebra.fit import FitResult, fit_chain

torch.set_num_threads(1)


def compose_pair(first, second, groups):
    """Reference composition (``first`` applied first), independent of expandctl."""
    c3, c2g = second.shape[:2]
    c2 = first.shape[0]
    ks = second.shape[2:]
    w = second.reshape(groups, c3 // groups, c2g, *ks).transpose(1, 2).reshape(c2, c3 // groups, *ks)
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[first.dim() - 3]
    return conv_t(first.transpose(0, 1), w, groups=groups).transpose(0, 1)


def compose(weights, groups):
    out = weights[0].double()
    for w in weights[1:]:
        out = compose_pair(out, w.double(), groups)
    return out


def make(m, n, widths, kernel, steps, groups=1, dtype=torch.float64):
    chans = [m, *widths, n]
    init = [
        torch.randn(c_out, c_in // groups, *k, dtype=dtype) / (c_in // groups * 9) ** 0.5
        for c_in, c_out, k in zip(chans[:-1], chans[1:], steps, strict=True)
    ]
    return torch.randn(n, m // groups, *kernel, dtype=dtype), init


def rel_error(weights, target, groups):
    target = target.double()
    return ((compose(weights, groups) - target).norm() / target.norm()).item()


def check_exact(target, init, groups=1, tol=1e-9):
    saved = [w.clone() for w in init]
    result = fit_chain(target, init, groups)
    assert isinstance(result, FitResult)
    assert all(torch.equal(a, b) for a, b in zip(init, saved, strict=True)), "init was modified"
    assert [w.shape for w in result.weights] == [w.shape for w in init]
    assert [w.dtype for w in result.weights] == [w.dtype for w in init]
    assert result.residual < tol
    assert rel_error(result.weights, target, groups) < tol
    assert result.seconds >= 0 and result.iterations >= 0
    return result


def test_one_solve_case_is_exact():
    # 3->16 7x7 at h = 12, 64: 64 * 9 rows >= 3 * 49 columns, so no alternating sweeps are needed.
    target, init = make(3, 16, [12, 64], (7, 7), [(3, 3)] * 3)
    result = check_exact(target, init)
    assert result.iterations == 0


def test_dense_rate_four_is_exact_without_iterations():
    target, init = make(8, 8, [32, 32], (7, 7), [(3, 3)] * 3)
    assert check_exact(target, init).iterations == 0


@pytest.mark.parametrize(
    "kernel,steps,widths",
    [
        ((7,), [(3,), (3,), (3,)], [16, 16]),  # Conv1d
        ((5, 5, 5), [(3, 3, 3), (3, 3, 3)], [12]),  # Conv3d
        ((5, 7), [(3, 3), (3, 3), (1, 3)], [16, 16]),  # non-square
        ((4,), [(3,), (2,)], [16]),  # even: 3 then 2
        ((6, 6), [(3, 3), (3, 3), (2, 2)], [16, 16]),
        ((9, 9), [(3, 3)] * 4, [16, 16, 16]),  # four factors
    ],
)
def test_shapes_and_dimensions(kernel, steps, widths):
    target, init = make(2, 3, widths, kernel, steps)
    check_exact(target, init)


@pytest.mark.parametrize("channels,hidden", [(12, 4), (6, 8)])
def test_depthwise(channels, hidden):
    # ConvNeXt-style 7x7 depthwise (groups = C, one channel per group) at rate 4 and 8.
    c, h = channels, channels * hidden
    target, init = make(c, c, [h, h], (7, 7), [(3, 3)] * 3, groups=c)
    check_exact(target, init, groups=c)


def test_grouped_dense():
    target, init = make(8, 12, [32, 48], (7, 7), [(3, 3)] * 3, groups=4)
    check_exact(target, init, groups=4)


def test_float32_weights_and_honest_residual():
    target, init = make(4, 4, [16, 16], (7, 7), [(3, 3)] * 3, dtype=torch.float32)
    result = fit_chain(target, init)
    assert all(w.dtype == torch.float32 for w in result.weights)
    actual = rel_error(result.weights, target, 1)
    assert result.residual == pytest.approx(actual, rel=1e-6)
    assert actual < 1e-5  # float32 rounding of the factors, not a fitting error


def test_rate_too_small_reports_large_residual():
    # 16->16 7x7 through widths 16, 16: the fit cannot be exact and must say so.
    target, init = make(16, 16, [16, 16], (7, 7), [(3, 3)] * 3)
    result = fit_chain(target, init)
    assert result.residual > 1e-2
    assert result.residual == pytest.approx(rel_error(result.weights, target, 1), rel=1e-9)


def test_zero_target_and_single_factor():
    _, init = make(4, 4, [16, 16], (7, 7), [(3, 3)] * 3)
    result = fit_chain(torch.zeros(4, 4, 7, 7, dtype=torch.float64), init)
    assert result.residual == 0.0
    assert compose(result.weights, 1).abs().max() == 0
    target = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    result = fit_chain(target, [torch.randn(5, 3, 3, 3, dtype=torch.float64)])
    assert result.residual == 0.0 and torch.equal(result.weights[0], target)


@pytest.mark.parametrize("hidden", [4, 40])  # wide D (4 * 9 < 3 * 25 rows) and tall D (40 * 9 > 75)
@pytest.mark.parametrize("groups", [1, 3])
def test_single_factor_solves_recover_a_realisable_factor(hidden, groups):
    from expandctl.algebra.fit import _solve_first, _solve_last

    g = groups
    first = torch.randn(hidden * g, 3, 3, 3, dtype=torch.float64)
    second = torch.randn(2 * g, hidden, 3, 3, dtype=torch.float64)
    target = compose_pair(first, second, g)
    last = _solve_last(target, first, (3, 3), g)
    assert last.shape == second.shape
    assert rel_error([first, last], target, g) < 1e-9
    head = _solve_first(target, second, (3, 3), g)
    assert head.shape == first.shape
    assert rel_error([head, second], target, g) < 1e-9
