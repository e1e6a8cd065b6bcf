"""Transposed convolutions: cl / ck chains, preserve init, output_size, plan, and a U-Net-style decoder."""

import pytest
import torch
import torch.nn as nn

import expandctl
from expandctl.layers import ExpandedConvTransposeCK, ExpandedConvTransposeCL


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind,rate", [("cl", 1), ("cl", 2), ("ck", 4)])
def test_preserve_keeps_the_function(kind, rate):
    conv = nn.ConvTranspose2d(3, 4, 5, stride=2, padding=2, output_padding=1, dtype=torch.float64)
    big = expandctl.expand(conv, strategy=kind, rate=rate, init="preserve", seed=0)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        assert rel(big(x), conv(x)) < 1e-10
        assert rel(expandctl.set_forward(big, "explicit")(x), conv(x)) < 1e-10


def test_layout_of_the_chains():
    conv = nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1, output_padding=1, dtype=torch.float64)
    ck = expandctl.expand(conv, strategy="ck", rate=2)
    assert isinstance(ck, ExpandedConvTransposeCK)
    # Upsample first (stride, output_padding), crop last (padding), bias only after the last kernel.
    assert [f.stride for f in ck.factors] == [(2, 2), (1, 1)]
    assert [f.output_padding for f in ck.factors] == [(1, 1), (0, 0)]
    assert [f.padding for f in ck.factors] == [(0, 0), (1, 1)]
    assert [f.bias is not None for f in ck.factors] == [False, True]
    cl = expandctl.expand(conv, strategy="cl", rate=2)
    assert isinstance(cl, ExpandedConvTransposeCL)
    assert [f.kernel_size for f in cl.factors] == [(1, 1), (4, 4), (1, 1)]
    assert [f.bias is not None for f in cl.factors] == [False, True, True]
    p = expandctl.plan(conv, strategy="ck", rate=2)
    # kernel 4 = 3x3 then 2x2; the first factor has no bias.
    assert p.entries[0].params_after == sum(q.numel() for q in ck.parameters()) == 8 * 4 * 9 + 6 * 8 * 4 + 6


@pytest.mark.parametrize("kind", ["cl", "ck"])
def test_output_size_argument(kind):
    conv = nn.ConvTranspose2d(3, 4, 5, stride=2, padding=2, dtype=torch.float64)
    big = expandctl.expand(conv, strategy=kind, rate=2, forward="explicit")
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        explicit = big(x, output_size=[14, 14])
        assert explicit.shape[-2:] == (14, 14)
        small = expandctl.contract(big)
        assert rel(small(x, output_size=[14, 14]), explicit) < 1e-12
        assert rel(expandctl.set_forward(big, "fused")(x, output_size=[14, 14]), explicit) < 1e-12


class Decoder(nn.Module):
    """A U-Net decoder step: upsample by a transposed conv, concatenate the skip, convolve."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.fuse = nn.Conv2d(7, 2, 3, padding=1)

    def forward(self, x):
        return self.fuse(torch.cat([self.up(torch.relu(self.down(x))), x], 1))


def test_unet_decoder_roundtrip():
    model = Decoder().double().eval()
    plan = expandctl.plan(model, strategy="ck+cl", rate=2)
    assert {e.path: e.kind for e in plan} == {"down": "cl", "up": "ck", "fuse": "cl"}
    big = expandctl.expand(model, strategy="ck+cl", rate=2, seed=0)
    small = expandctl.contract(big)
    assert type(small.up) is nn.ConvTranspose2d
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel(small(x), expandctl.set_forward(big, "explicit")(x)) < 1e-12


def test_transposed_subclass_is_refused():
    class Mine(nn.ConvTranspose2d):
        def forward(self, x, output_size=None):
            return super().forward(x, output_size) * 2

    p = expandctl.plan(nn.Sequential(Mine(2, 2, 5)), strategy="ck+cl")
    assert p.entries[0].kind is None and "subclasses a transposed convolution" in p.entries[0].reason
