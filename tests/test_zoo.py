"""Real model zoos (timm, built without weights): depthwise, grouped, strided, even-kernel,
dilated, non-square and mixed kernels, attention; layers whose forward is not plain are left alone."""

import pytest
import torch
from helpers import randomize_batchnorm

import expandctl

timm = pytest.importorskip("timm")

# name, create_model kwargs, input size, what makes it interesting
ZOO = [
    ("convnext_atto", {}, 64, "7x7 depthwise, 4x4 stride-4 stem (even kernel)"),
    ("efficientnet_b0", {}, 64, "depthwise 3x3/5x5 with stride"),
    ("regnetx_002", {}, 64, "grouped 3x3"),
    ("mixnet_s", {}, 64, "mixed 3/5/7/9 depthwise kernels"),
    ("mobilenetv3_small_050", {}, 64, "timm Linear subclass, hard-swish, SE"),
    ("tf_efficientnet_b0", {}, 64, "Conv2dSame (runtime padding): fused-only"),
    ("resnet18", {"output_stride": 8}, 48, "dilated 3x3 convs"),
    ("inception_v3", {}, 80, "1x7 / 7x1 non-square kernels"),
    ("levit_128s", {}, 224, "attention and linear-heavy"),
]


@pytest.mark.parametrize("name,kwargs,size,why", ZOO, ids=[z[0] for z in ZOO])
def test_timm_model_roundtrip(name, kwargs, size, why):
    model = randomize_batchnorm(timm.create_model(name, pretrained=False, num_classes=10, **kwargs)).double().eval()
    plan = expandctl.plan(model, strategy="ck+cl+fc", rate=2)
    big = expandctl.expand(model, strategy="ck+cl+fc", rate=2, seed=0)
    small = expandctl.contract(big)
    assert [type(m) for m in small.modules()] == [type(m) for m in model.modules()]
    assert [(n, p.shape) for n, p in small.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        reference = expandctl.set_forward(big, "explicit")(x)
        err = ((small(x) - reference).abs().max() / reference.abs().max()).item()
    assert err < 1e-10, f"{name}: {err:.3g}"
    left = {e.reason for e in plan if e.kind is None}
    assert not any("overrides" in r for r in left), left
    notes = {e.note for e in plan.expanded if e.note}
    if name == "tf_efficientnet_b0":
        assert notes and all("Conv2dSame overrides forward" in n for n in notes)
        assert any(type(m).__name__ == "Conv2dSame" for m in small.modules())
    else:
        assert not notes
    if name == "inception_v3":
        kernels = {tuple(e.shape.split()[1].split("x")) for e in plan.expanded if e.kind == "ck"}
        assert ("1", "7") in kernels and ("7", "1") in kernels
    if name == "convnext_atto":
        assert plan.entries[0].kind == "ck" and plan.entries[0].shape.startswith("3->40 4x4 s4")
