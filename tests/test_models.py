"""Whole models: expand with every strategy, contract, and compare against the expanded model run
in explicit mode (so the composition is never checked against itself). Eval mode, random
BatchNorm statistics, float64. The contracted model must have the original's module types,
shapes and parameter count."""

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import randomize_batchnorm

import expandctl
from expandctl.models import SmallNet

STRATEGIES = ["fc", "cl", "ck", "cl+fc", "ck+fc", "ck+cl", "ck+cl+fc"]
TOL = 1e-10

MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 32, 32)),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10), (3, 32, 32)),
    "smallnet7": (lambda: SmallNet(kernel_size=7), (3, 32, 32)),
    "smallnet3_mnist": (lambda: SmallNet(kernel_size=3, in_channels=1, image_size=28), (1, 28, 28)),
}


def structure(model: nn.Module):
    return [(n, type(m).__name__) for n, m in model.named_modules()], [
        (n, tuple(p.shape)) for n, p in model.named_parameters()
    ]


def check_roundtrip(model: nn.Module, input_shape, strategy, rate=4, pointwise=False):
    model = randomize_batchnorm(model.double().eval())
    try:
        big = expandctl.expand(model, strategy=strategy, rate=rate, pointwise=pointwise, seed=0)
    except expandctl.NothingToExpandError:
        return None
    small = expandctl.contract(big)
    assert structure(small) == structure(model)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters())
    assert all(p.is_contiguous() for p in small.parameters())  # else ONNX export records extra nodes
    x = torch.randn(2, *input_shape, dtype=torch.float64)
    with torch.no_grad():
        reference = expandctl.set_forward(big, "explicit")(x)
        out = small(x)
    err = ((out - reference).abs().max() / reference.abs().max()).item()
    assert err < TOL, f"{strategy}: relative error {err:.3g}"
    return err


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(MODELS))
def test_model_roundtrip(name, strategy):
    factory, shape = MODELS[name]
    check_roundtrip(factory(), shape, strategy)


def test_smallnet_every_kernel_is_expanded_as_planned():
    p = expandctl.plan(SmallNet(kernel_size=7), strategy="ck+fc", rate=4)
    assert [(e.path, e.kind) for e in p.expanded] == [
        ("features.0", "ck"),
        ("features.4", "ck"),
        ("features.8", "ck"),
        ("classifier.1", "fc"),
        ("classifier.3", "fc"),
    ]


def test_mobilenet_depthwise_stays_depthwise():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    big = expandctl.expand(model, strategy="cl", rate=4)
    dw = big.features[1].conv[0][0]
    assert isinstance(dw, expandctl.ExpandedConvCL)
    assert all(f.groups == 32 for f in dw.factors)
    assert [f.out_channels for f in dw.factors] == [128, 128, 32]


def test_pointwise_expands_1x1_convs_too():
    check_roundtrip(torchvision.models.shufflenet_v2_x0_5(num_classes=10), (3, 32, 32), "cl", pointwise=True)
