"""Property tests: random layers -> expand (scratch init) -> contract gives the same function.

Outputs are compared in float64, contracted layer vs the expanded layer run in explicit mode (the
chain on the activations), to 1e-10 relative to the output scale. `make test` runs the `ci`
profile (a few hundred examples in all); `make test-deep` runs thousands.
"""

import math
import os

import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import expandctl

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    if os.environ.get("EXPANDCTL_RECORD_ERRORS"):  # worst-case reporting: make test-deep
        with open(os.environ["EXPANDCTL_RECORD_ERRORS"], "a") as f:
            f.write(f"{err!r}\n")
    return err


@st.composite
def conv_case(draw, dims):
    groups_kind = draw(st.sampled_from(["1", "g", "dw"]))
    g = 1 if groups_kind == "1" else draw(st.integers(2, 3)) if groups_kind == "g" else draw(st.integers(2, 4))
    c_in = g * (1 if groups_kind == "dw" else draw(st.integers(1, 3)))
    c_out = g * draw(st.integers(1, 3))
    max_k = {1: 9, 2: 8, 3: 5}[dims]
    kernel = tuple(draw(st.integers(1, max_k)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    pad_kind = draw(st.sampled_from(["int", "same", "valid"] if max(stride) == 1 else ["int", "valid"]))
    if pad_kind == "int":
        padding = tuple(draw(st.integers(0, (d * (k - 1) + 1) // 2 + 1)) for k, d in zip(kernel, dilation))
    else:
        padding = pad_kind
    bias = draw(st.booleans())
    rate = draw(st.sampled_from([1, 1.5, 2, 4]))
    # Input big enough for the kernel and for reflect padding (pad < size).
    sizes = []
    for j, (k, d) in enumerate(zip(kernel, dilation)):
        pad = padding[j] if isinstance(padding, tuple) else (d * (k - 1) if padding == "same" else 0)
        need = max(d * (k - 1) + 1 - 2 * pad if padding != "same" else 1, pad + 1, 1)
        sizes.append(draw(st.integers(need, need + {1: 9, 2: 5, 3: 2}[dims])))
    batch = draw(st.integers(1, 2))
    options = ["cl"] + (["ck"] if max(kernel) > 3 else [])
    kind = draw(st.sampled_from(options))
    return dict(
        c_in=c_in,
        c_out=c_out,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        groups=g,
        padding=padding,
        mode=mode,
        bias=bias,
        rate=rate,
        sizes=sizes,
        batch=batch,
        kind=kind,
        dims=dims,
    )


def check_conv(case):
    conv = CONV[case["dims"]](
        case["c_in"],
        case["c_out"],
        case["kernel"],
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        bias=case["bias"],
        padding_mode=case["mode"],
        dtype=torch.float64,
    )
    big = expandctl.expand(conv, strategy=case["kind"], rate=case["rate"], pointwise=True, forward="explicit")
    assert isinstance(big, expandctl.ExpandedLayer) and big.kind == case["kind"]
    for f in big.factors:
        assert f.groups == case["groups"] and f.padding_mode == "zeros"
        assert all(p == 0 for p in f.padding)
    small = expandctl.contract(big)
    assert type(small) is type(conv)
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ):
        assert getattr(small, attr) == getattr(conv, attr), attr
    assert (small.bias is None) == (conv.bias is None)
    x = torch.randn(case["batch"], case["c_in"], *case["sizes"], dtype=torch.float64)
    with torch.no_grad():
        expected = big(x)
        assert rel_err(small(x), expected) < TOL
        big.set_forward("fused")
        assert rel_err(big(x), expected) < TOL


@given(conv_case(1))
def test_conv1d_contracts_exactly(case):
    check_conv(case)


@given(conv_case(2))
def test_conv2d_contracts_exactly(case):
    check_conv(case)


@given(conv_case(3))
def test_conv3d_contracts_exactly(case):
    check_conv(case)


@given(
    st.integers(1, 20),
    st.integers(1, 20),
    st.booleans(),
    st.sampled_from([1, 1.25, 2, 4]),
    st.lists(st.integers(1, 3), max_size=2),
)
def test_linear_contracts_exactly(m, n, bias, rate, lead):
    lin = nn.Linear(m, n, bias=bias, dtype=torch.float64)
    big = expandctl.expand(lin, strategy="fc", rate=rate, forward="explicit")
    widths = [f.out_features for f in big.factors]
    assert widths == [math.ceil(rate * m), math.ceil(rate * n), n]
    small = expandctl.contract(big)
    x = torch.randn(*lead, m, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(small(x), big(x)) < TOL


TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@st.composite
def conv_transpose_case(draw, dims):
    groups_kind = draw(st.sampled_from(["1", "g", "dw"]))
    g = 1 if groups_kind == "1" else draw(st.integers(2, 3)) if groups_kind == "g" else draw(st.integers(2, 4))
    c_in = g * (1 if groups_kind == "dw" else draw(st.integers(1, 3)))
    c_out = g * draw(st.integers(1, 3))
    max_k = {1: 9, 2: 7, 3: 5}[dims]
    kernel = tuple(draw(st.integers(1, max_k)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    # torch: output_padding < max(stride, dilation) per dimension; padding crops the full output.
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    sizes = [draw(st.integers(1, {1: 7, 2: 4, 3: 2}[dims])) for _ in range(dims)]
    padding = []
    for k, s, d, op, n in zip(kernel, stride, dilation, output_padding, sizes):
        full = (n - 1) * s + d * (k - 1) + op + 1
        padding.append(draw(st.integers(0, (full - 1) // 2)))  # at least one output position
    options = ["cl"] + (["ck"] if max(kernel) > 3 else [])
    return dict(
        dims=dims,
        c_in=c_in,
        c_out=c_out,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        output_padding=output_padding,
        padding=tuple(padding),
        groups=g,
        bias=draw(st.booleans()),
        rate=draw(st.sampled_from([1, 1.5, 2, 4])),
        sizes=sizes,
        batch=draw(st.integers(1, 2)),
        kind=draw(st.sampled_from(options)),
    )


def check_conv_transpose(case):
    conv = TRANSPOSED[case["dims"]](
        case["c_in"],
        case["c_out"],
        case["kernel"],
        stride=case["stride"],
        padding=case["padding"],
        output_padding=case["output_padding"],
        groups=case["groups"],
        bias=case["bias"],
        dilation=case["dilation"],
        dtype=torch.float64,
    )
    big = expandctl.expand(conv, strategy=case["kind"], rate=case["rate"], pointwise=True, forward="explicit")
    assert isinstance(big, expandctl.ExpandedLayer) and big.kind == case["kind"]
    for f in big.factors:
        assert type(f) is type(conv) and f.groups == case["groups"]
    small = expandctl.contract(big)
    assert type(small) is type(conv)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "dilation"):
        assert getattr(small, attr) == getattr(conv, attr), attr
    assert small.groups == conv.groups and (small.bias is None) == (conv.bias is None)
    x = torch.randn(case["batch"], case["c_in"], *case["sizes"], dtype=torch.float64)
    with torch.no_grad():
        expected = big(x)
        assert expected.shape == conv(x).shape
        assert rel_err(small(x), expected) < TOL
        big.set_forward("fused")
        assert rel_err(big(x), expected) < TOL


@given(conv_transpose_case(1))
def test_conv_transpose1d_contracts_exactly(case):
    check_conv_transpose(case)


@given(conv_transpose_case(2))
def test_conv_transpose2d_contracts_exactly(case):
    check_conv_transpose(case)


@given(conv_transpose_case(3))
def test_conv_transpose3d_contracts_exactly(case):
    check_conv_transpose(case)
