"""Expanded layers and model rewriting: modes, gradients, init, plan, and the API's promises."""

import copy

import pytest
import torch
import torch.nn as nn

import expandctl
from expandctl import algebra
from expandctl.layers import ExpandedConvCK, ExpandedConvCL, ExpandedConvTransposeCK, ExpandedLinear


def conv_net(dtype=torch.float64):
    return nn.Sequential(
        nn.Conv2d(3, 8, 7, padding=3, padding_mode="reflect"),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.Conv2d(8, 12, 1),
        nn.Conv2d(12, 12, (1, 5), padding=(0, 2), bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    ).to(dtype)


@pytest.mark.parametrize("strategy", ["ck+fc", "cl+fc", "ck+cl+fc"])
def test_fused_and_explicit_match_in_output_and_factor_gradients(strategy):
    torch.manual_seed(1)
    big = expandctl.expand(conv_net(), strategy=strategy, rate=2, pointwise=True)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    results = {}
    for mode in ("fused", "explicit"):
        model = copy.deepcopy(big)
        expandctl.set_forward(model, mode)
        out = model(x)
        out.square().sum().backward()
        results[mode] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["fused"][0], results["explicit"][0], rtol=1e-11, atol=1e-12)
    grads_f, grads_e = results["fused"][1], results["explicit"][1]
    assert grads_f.keys() == grads_e.keys()
    assert any(".factors." in n for n in grads_f)
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_e[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(6, 9),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Conv2d(4, 8, 5, stride=2, padding=2, groups=2, bias=False),
        nn.Conv1d(3, 3, 3, groups=3, padding=1, padding_mode="circular"),
        nn.Conv2d(6, 6, 1, groups=3),
    ],
)
def test_preserve_is_exact_for_fc_and_cl(layer):
    layer = layer.double()
    strategy = "fc" if isinstance(layer, nn.Linear) else "cl"
    big = expandctl.expand(layer, strategy=strategy, rate=2, init="preserve", pointwise=True)
    w, b = big.equivalent()
    torch.testing.assert_close(w, layer.weight, rtol=1e-12, atol=1e-12)
    if layer.bias is not None:
        torch.testing.assert_close(b, layer.bias, rtol=1e-12, atol=1e-12)
    x = torch.randn(
        2, layer.weight.shape[1] * getattr(layer, "groups", 1), *([7] * (layer.weight.dim() - 2)), dtype=torch.float64
    )
    with torch.no_grad():
        expandctl.set_forward(big, "explicit")
        torch.testing.assert_close(big(x), layer(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(expandctl.contract(big)(x), layer(x), rtol=1e-10, atol=1e-10)


def test_preserve_ck_fits_within_reported_residual():
    conv = nn.Conv2d(3, 16, 7, padding=3, dtype=torch.float64)
    big = expandctl.expand(conv, strategy="ck", rate=4, init="preserve")
    assert big.fit_residual is not None and big.fit_residual < 1e-8
    w, _ = big.equivalent()
    err = ((w - conv.weight).norm() / conv.weight.norm()).item()
    assert err <= big.fit_residual * 1.01 + 1e-14
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(expandctl.contract(big)(x), conv(x), rtol=1e-6, atol=1e-6)


def test_preserve_ck_refuses_a_rate_too_small():
    conv = nn.Conv2d(16, 16, 7, padding=3)
    with pytest.raises(expandctl.PreserveFitError, match="rate"):
        expandctl.expand(conv, strategy="ck", rate=1, init="preserve")


def test_chain_layout_follows_the_paper():
    conv = nn.Conv2d(3, 16, 7, stride=2, padding=3, dilation=1)
    ck = expandctl.expand(conv, strategy="ck", rate=4)
    assert [f.kernel_size for f in ck.factors] == [(3, 3)] * 3
    assert [f.out_channels for f in ck.factors] == [12, 64, 16]
    assert [f.stride for f in ck.factors] == [(1, 1), (1, 1), (2, 2)]  # stride on the last factor
    cl = expandctl.expand(nn.Conv2d(8, 16, 3, stride=2, dilation=2, padding=2), strategy="cl", rate=4)
    assert [f.kernel_size for f in cl.factors] == [(1, 1), (3, 3), (1, 1)]
    assert [f.stride for f in cl.factors] == [(1, 1), (2, 2), (1, 1)]  # stride on the k x k factor
    assert [f.dilation for f in cl.factors] == [(1, 1), (2, 2), (1, 1)]
    dw = expandctl.expand(nn.Conv2d(32, 32, 3, groups=32, padding=1), strategy="cl", rate=4)
    assert [(f.in_channels, f.out_channels, f.groups) for f in dw.factors] == [
        (32, 128, 32),
        (128, 128, 32),
        (128, 32, 32),
    ]


def test_expand_does_not_mutate_and_keeps_dtype_and_mode():
    model = conv_net(torch.float32).eval()
    before = copy.deepcopy(model.state_dict())
    big = expandctl.expand(model, strategy="ck+cl+fc", rate=2)
    assert not any(isinstance(m, expandctl.ExpandedLayer) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not big.training and all(not m.training for m in big.modules())
    assert all(p.dtype == torch.float32 for p in big.parameters())
    small = expandctl.contract(big)
    assert not small.training
    assert [type(m) for m in small.modules()] == [type(m) for m in model.modules()]


def test_inplace_expand_and_contract():
    model = conv_net()
    out = expandctl.expand(model, strategy="fc", rate=2, inplace=True)
    assert out is model and isinstance(model[8], ExpandedLinear)
    back = expandctl.contract(model, inplace=True)
    assert back is model and type(model[8]) is nn.Linear


def test_contract_is_idempotent_on_compact_models():
    model = conv_net()
    small = expandctl.contract(model)
    assert small is not model
    assert [type(m) for m in small.modules()] == [type(m) for m in model.modules()]
    for (k, v), (k2, v2) in zip(model.state_dict().items(), small.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_expanding_an_expanded_layer_is_refused():
    big = expandctl.expand(conv_net(), strategy="cl", rate=2)
    with pytest.raises(expandctl.AlreadyExpandedError, match="contract"):
        expandctl.expand(big, strategy="cl", rate=2)
    # other layers of a partly expanded model can still be expanded
    both = expandctl.expand(big, strategy="fc", rate=2)
    assert isinstance(both[8], ExpandedLinear)


def test_bad_arguments_raise_typed_errors():
    model = conv_net()
    with pytest.raises(expandctl.UsageError, match="rate"):
        expandctl.expand(model, rate=0.5)
    with pytest.raises(expandctl.UsageError, match="unknown strategy"):
        expandctl.expand(model, strategy="ck+xx")
    with pytest.raises(expandctl.NothingToExpandError):
        expandctl.expand(nn.Sequential(nn.ReLU()), strategy="ck")
    with pytest.raises(expandctl.UsageError, match="init"):
        expandctl.expand(model, strategy="fc", init="magic")
    with pytest.raises(expandctl.UsageError, match="forward"):
        expandctl.set_forward(model, "sideways")


def test_plan_reports_every_candidate_with_reasons():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 7),
        nn.Conv2d(8, 8, 3),
        nn.Conv2d(8, 8, 1),
        nn.ConvTranspose2d(8, 8, 3),
        nn.LazyConv2d(8, 3),
        nn.Linear(8, 4),
    )
    p = expandctl.plan(model, strategy="ck+fc", rate=4)
    rows = {e.path: e for e in p}
    assert rows["0"].kind == "ck" and rows["0"].factors == ["3->12 3x3", "12->32 3x3", "32->8 3x3"]
    assert rows["0"].params_before == 8 * 3 * 49 + 8
    assert rows["0"].params_after == (12 * 3 * 9 + 12) + (32 * 12 * 9 + 32) + (8 * 32 * 9 + 8)
    assert rows["1"].kind is None and "3 or smaller" in rows["1"].reason
    assert rows["2"].kind is None
    assert rows["3"].kind is None and "3 or smaller" in rows["3"].reason  # transposed: ck needs k > 3
    assert rows["4"].kind is None and "lazy" in rows["4"].reason
    assert rows["5"].kind == "fc"
    p2 = expandctl.plan(model, strategy="cl", rate=4, exclude=["0"])
    assert {e.path: e.kind for e in p2}["1"] == "cl" and "exclude" in {e.path: e for e in p2}["0"].reason
    p3 = expandctl.plan(model, strategy="cl", rate=4, pointwise=True, include=["2"])
    assert [e.path for e in p3.expanded] == ["2"]
    assert p.to_dict()["layers"][0]["kind"] == "ck"


class WeightStandardizedConv(nn.Conv2d):
    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
            self.weight.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return self._conv_forward(x, w, self.bias)


class PlainSubclass(nn.Conv2d):
    """Only adds an attribute: expandable, and contraction gives this class back."""

    tag = "mine"


def test_subclasses_that_change_forward_run_fused_only():
    model = nn.Sequential(WeightStandardizedConv(3, 8, 3), PlainSubclass(8, 8, 3))
    p = expandctl.plan(model, strategy="cl")
    assert p.entries[0].kind == "cl" and "fused only" in p.entries[0].note and "overrides forward" in p.entries[0].note
    assert p.entries[1].kind == "cl" and p.entries[1].note is None
    small = expandctl.contract(expandctl.expand(model, strategy="cl"))
    assert type(small[1]) is PlainSubclass and type(small[0]) is WeightStandardizedConv


def test_shared_modules_stay_shared():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    big = expandctl.expand(model, strategy="fc", rate=2)
    assert big[0] is big[2] and isinstance(big[0], ExpandedLinear)
    assert expandctl.plan(model, strategy="fc").entries[0].aliases == ["2"]
    small = expandctl.contract(big)
    assert small[0] is small[2] and type(small[0]) is nn.Linear
    x = torch.randn(3, 4)
    torch.testing.assert_close(small(x), expandctl.set_forward(big, "explicit")(x), rtol=1e-5, atol=1e-6)


def test_layout_rebuilds_the_same_structure():
    big = expandctl.expand(conv_net(), strategy="ck+cl+fc", rate=3, pointwise=True)
    spec = expandctl.layout(big)
    assert spec["0"] == {"kind": "ck", "hidden": [9, 24]}
    rebuilt = expandctl.apply_layout(conv_net(), spec)
    rebuilt.load_state_dict(big.state_dict())  # strict: same keys and shapes
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    big.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), big(x))


def test_attention_reads_the_composed_weight():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    layer = layer.double().eval()
    big = expandctl.expand(layer, strategy="fc", rate=2)
    assert isinstance(big.self_attn.out_proj, ExpandedLinear)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = expandctl.set_forward(copy.deepcopy(big), "explicit")(x)
        torch.testing.assert_close(expandctl.contract(big)(x), expected, rtol=1e-10, atol=1e-10)


def test_model_code_reads_the_replaced_layers_hyperparameters():
    class Downsample(nn.Module):  # pads by its conv's kernel size at run time, as timm's DaViT does
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, (2, 3), stride=2)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            k_h, k_w = self.conv.kernel_size
            x = nn.functional.pad(x, (0, (k_w - x.shape[-1] % k_w) % k_w, 0, (k_h - x.shape[-2] % k_h) % k_h))
            x = self.conv(x).mean((2, 3))
            assert x.shape[1] == self.conv.out_channels and self.fc.in_features == 6
            return self.fc(x)

    model = Downsample().double().eval()
    big = expandctl.expand(model, strategy="cl+fc", rate=2, init="preserve")
    assert isinstance(big.conv, ExpandedConvCL)
    assert (big.conv.kernel_size, big.conv.stride, big.conv.in_channels) == ((2, 3), (2, 2), 3)
    assert (big.fc.in_features, big.fc.out_features) == (6, 4)
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(big(x), model(x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(expandctl.set_forward(copy.deepcopy(big), "explicit")(x), model(x))
    with pytest.raises(AttributeError):
        big.conv.not_an_attribute  # noqa: B018


def test_no_grad_cache_tracks_parameter_updates():
    big = expandctl.expand(nn.Conv2d(2, 3, 5, padding=2), strategy="ck", rate=2)
    with torch.no_grad():
        w1, _ = big.equivalent()
        assert big.equivalent()[0] is w1  # cached
        big.factors[0].weight.add_(1.0)
        w2, _ = big.equivalent()
    assert not torch.equal(w1, w2)
    w3, _ = big.equivalent()  # with autograd: fresh, differentiable
    assert w3.requires_grad
    torch.testing.assert_close(w3.detach(), w2)


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError):
        expandctl.register_expansion(ExpandedConvCL)
    assert {"fc", "cl", "ck"} <= set(expandctl.EXPANSIONS)
    assert ExpandedConvCK in expandctl.EXPANSIONS["ck"]
    # One registry for every layer type: the transposed classes are found under the same names.
    assert expandctl.layers.expansion_for("ck", nn.ConvTranspose2d(4, 4, 5)) is ExpandedConvTransposeCK
    assert expandctl.layers.expansion_for("ck", nn.Conv2d(4, 4, 5)) is ExpandedConvCK
    assert expandctl.layers.expansion_for("fc", nn.Conv2d(4, 4, 5)) is None


def test_chain_order_is_cheapest_for_cl():
    big = expandctl.expand(nn.Conv2d(64, 128, 7, padding=3), strategy="cl", rate=4)
    assert big._order == algebra.chain_order(tuple(tuple(f.weight.shape) for f in big.factors))


def test_composition_ignores_autocast():
    big = expandctl.expand(nn.Conv2d(4, 6, 5, padding=2), strategy="ck", rate=2).eval()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w_auto, _ = big.equivalent()
            assert big(x).dtype == torch.bfloat16
        assert w_auto.dtype == torch.float32
        assert big(x).dtype == torch.float32  # the cache never hands a bf16 kernel to a float32 call
