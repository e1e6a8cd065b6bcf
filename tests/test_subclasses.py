"""Conv / Linear subclasses with their own forward (weight standardisation, runtime padding, fake
quantisation): expanded by composing the kernel and running the subclass's forward on it (fused
only); contraction gives the subclass back; a forward that does not read self.weight is refused."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import expandctl
from expandctl.verify import check_contraction

timm_layers = pytest.importorskip("timm.layers")


class FakeQuantLinear(nn.Linear):
    """QAT-style: a learnable per-row scale, weights rounded to 4 bits (straight-through)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.full((self.out_features, 1), 0.1, dtype=self.weight.dtype))

    def forward(self, x):
        w = self.weight / self.scale
        w = (w.round().clamp(-8, 7) - w).detach() + w
        return F.linear(x, w * self.scale, self.bias)


class CachedWeightConv(nn.Conv2d):
    """Runs on a buffer it keeps, never on self.weight: expanding would change nothing it computes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("frozen", self.weight.detach().clone())

    def forward(self, x):
        return self._conv_forward(x, self.frozen, self.bias)


def _scaled_std():
    conv = timm_layers.ScaledStdConv2d(4, 6, 5, stride=2, padding=2)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 2.0)
    return conv


CASES = [
    ("StdConv2d", lambda: timm_layers.StdConv2d(4, 6, 3, padding=1, bias=False), [2, 4, 9, 9], "cl"),
    ("ScaledStdConv2d", _scaled_std, [2, 4, 9, 11], "ck"),
    ("Conv2dSame", lambda: timm_layers.Conv2dSame(4, 6, 4, stride=2), [2, 4, 9, 10], "ck"),
    ("FakeQuantLinear", lambda: FakeQuantLinear(5, 7), [3, 5], "fc"),
]


@pytest.mark.parametrize("name,make,shape,kind", CASES, ids=[c[0] for c in CASES])
def test_subclass_keeps_its_meaning(name, make, shape, kind):
    layer = make().double()
    model = nn.Sequential(layer)
    p = expandctl.plan(model, strategy="ck+cl+fc", rate=4)
    assert p.entries[0].kind == kind and p.entries[0].reason is None
    assert p.entries[0].note.startswith("fused only") and name in p.entries[0].note
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
    if name != "FakeQuantLinear":  # rounding is not continuous: a preserved product rounds elsewhere
        big = expandctl.expand(model, strategy="ck+cl+fc", rate=4, init="preserve", seed=0)
        with torch.no_grad():
            err = (big(x) - reference).abs().max() / reference.abs().max()
        assert err < 1e-10, err
    big = expandctl.expand(model, strategy="ck+cl+fc", rate=4, seed=0)
    assert big[0].fused_only is not None
    # The subclass's own state trains and saves with the factors.
    own = {n for n, _ in layer.named_parameters()} - {"weight", "bias"}
    assert {f"0.host.{n}" for n in own} <= set(big.state_dict())
    out = big(x)
    out.square().sum().backward()
    assert all(p.grad is not None for p in big.parameters())
    with torch.no_grad():
        fused = big(x)
        assert torch.equal(expandctl.set_forward(big, "explicit")(x), fused)  # fused-only: same function
        small = expandctl.contract(big)
        assert type(small[0]) is type(layer)
        assert torch.equal(small(x), fused)
        for n in own:
            assert torch.equal(getattr(small[0], n), getattr(big[0].host, n))
        composed, chain = big[0].linear_part(x)
        assert ((composed - chain).abs().max() / chain.abs().max()) < 1e-12
    reports = check_contraction(big, small, shape[1:], dtypes=(torch.float64,))
    assert reports[0].passed and reports[0].outputs[-1].name == "linear part of 1 fused-only layers"


def test_linear_part_check_catches_a_wrong_composition(monkeypatch):
    big = expandctl.expand(nn.Sequential(timm_layers.StdConv2d(3, 4, 3).double()), strategy="cl", rate=2)
    layer = big[0]
    # A composition that forgets the last factor: the subclass forward of both models agrees with
    # itself, only the comparison with the chain on activations can see it.
    monkeypatch.setattr(
        type(layer),
        "_compose",
        lambda self, fast=False: expandctl.algebra.compose_chain(
            [f.weight for f in self.factors[:2]] + [self.factors[2].weight * 2],
            [f.bias for f in self.factors],
            self.groups,
        ),
    )
    layer._cache = None
    report = check_contraction(big, expandctl.contract(big), [3, 8, 8], dtypes=(torch.float64,))[0]
    assert not report.passed and report.outputs[-1].name.startswith("linear part")


def test_subclass_that_does_not_read_its_weight_is_refused():
    model = nn.Sequential(CachedWeightConv(3, 4, 3), timm_layers.Linear(4, 4))
    p = expandctl.plan(model, strategy="cl+fc")
    assert p.entries[0].kind is None and "does not read self.weight" in p.entries[0].reason
    assert p.entries[1].kind == "fc" and p.entries[1].note is None  # a known plain subclass: explicit works


def test_fused_only_layer_survives_layout_and_state_dict():
    model = nn.Sequential(_scaled_std())
    big = expandctl.expand(model, strategy="ck", rate=2, seed=0)
    rebuilt = expandctl.apply_layout(nn.Sequential(_scaled_std()), expandctl.layout(big))
    rebuilt.load_state_dict(big.state_dict())
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), big(x), rtol=0, atol=0)
