import copy
import json

import pytest
import torch
import torch.nn as nn
from helpers import randomize_batchnorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

import expandctl
from expandctl.errors import UsageError
from expandctl.layers import ChainLayer
from expandctl.models import SmallNet
from expandctl.verify import DEFAULT_TOLERANCES, check_contraction, check_finite, compare_models

SHAPE = [3, 8, 8]


def small_net() -> nn.Module:
    return randomize_batchnorm(SmallNet(kernel_size=5, channels=(4, 8), hidden=8, image_size=8))


class Structured(nn.Module):
    """Dict and tuple outputs; ``scale`` perturbs only the ``aux.1`` leaf."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = scale

    def forward(self, x):
        y = self.fc(x)
        return {"logits": y, "aux": (2 * y, self.scale * y.sum(1))}


def test_identical_models_pass_with_zero_error():
    model = small_net()
    report = compare_models(model, copy.deepcopy(model), SHAPE)
    assert report.passed
    assert report.kind == "torch-vs-torch" and report.dtype == "float64"
    assert (report.samples, report.batch, report.input_shape) == (4, 2, SHAPE)
    assert [o.name for o in report.outputs] == ["output"]
    assert report.outputs[0].max_abs == 0 and report.outputs[0].max_rel == 0
    json.dumps(report.to_dict())


def test_perturbed_weight_fails_in_float64():
    model = small_net().double()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.features[0].weight[0, 0, 2, 2] += 1e-3
    report = compare_models(model, other, SHAPE)
    assert not report.passed
    assert report.outputs[0].max_abs > 1e-6
    assert report.outputs[0].reason is None
    # the same difference passes under a tolerance that covers it: the bound is what decides
    assert compare_models(model, other, SHAPE, atol=1e-2, rtol=0).passed


def test_metric_is_max_abs_relative_to_scale_not_a_signed_sum():
    a, b = nn.Linear(4, 2).double(), nn.Linear(4, 2).double()
    with torch.no_grad():
        b.load_state_dict(a.state_dict())
        b.bias += torch.tensor([1.0, -1.0], dtype=torch.float64)  # errors that cancel in a sum
    report = compare_models(a, b, [4])
    out = report.outputs[0]
    assert not report.passed
    assert out.max_abs == pytest.approx(1.0)
    ref = max(a(x).abs().max().item() for x in _inputs(report))
    assert out.max_rel == pytest.approx(out.max_abs / ref)


def _inputs(report):
    g = torch.Generator().manual_seed(report.seed)
    shape = (report.batch, *report.input_shape)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(report.samples)]


def test_dict_and_tuple_outputs_compare_leaf_by_leaf():
    a = Structured().double()
    b = copy.deepcopy(a)
    b.scale = 1.5
    report = compare_models(a, b, [4])
    assert [o.name for o in report.outputs] == ["output.logits", "output.aux.0", "output.aux.1"]
    assert [o.passed for o in report.outputs] == [True, True, False]
    assert not report.passed


def test_shape_mismatch_fails_with_reason():
    report = compare_models(nn.Linear(4, 3), nn.Linear(4, 2), [4])
    out = report.outputs[0]
    assert not report.passed and not out.passed
    assert "shape" in out.reason and "(2, 3)" in out.reason and "(2, 2)" in out.reason
    assert report.to_dict()["outputs"][0]["max_abs"] is None  # NaN is not JSON


def test_missing_output_and_nan_fail_with_reason():
    a = Structured()
    report = compare_models(a, nn.Linear(4, 3), [4])
    assert not report.passed
    assert "missing from the second" in report.outputs[0].reason
    nan_model = nn.Linear(4, 3)
    with torch.no_grad():
        nan_model.bias[1] = float("nan")
    report = compare_models(nn.Linear(4, 3), nan_model, [4])
    assert not report.passed and "NaN" in report.outputs[0].reason


def test_comparison_uses_eval_mode_copies_and_leaves_the_caller_alone():
    model = small_net().train()
    x = torch.randn(2, *SHAPE)
    assert not torch.allclose(model(x), copy.deepcopy(model).eval()(x))  # BN stats matter
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert compare_models(model, copy.deepcopy(model), SHAPE).passed
    # BatchNorm folded into the conv equals the model only in eval mode (the classic trap)
    folded = copy.deepcopy(model).eval()
    folded.features[0] = fuse_conv_bn_eval(folded.features[0], folded.features[1])
    folded.features[1] = nn.Identity()
    assert compare_models(model, folded, SHAPE).passed
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_expanded_layers_run_explicit_chain_on_a_copy(monkeypatch):
    expanded = expandctl.expand(small_net(), "ck+fc", rate=2, seed=0)
    calls = []
    original = ChainLayer._explicit
    monkeypatch.setattr(ChainLayer, "_explicit", lambda self, x: calls.append(1) or original(self, x))
    assert compare_models(expanded, expandctl.contract(expanded), SHAPE, samples=1).passed
    assert calls  # the factors ran one by one, not the composed kernel
    assert all(layer.forward_mode == "fused" for _, layer in expandctl.expanded_layers(expanded))


def test_check_contraction_passes_in_both_dtypes_and_catches_a_corrupt_factor():
    expanded = randomize_batchnorm(expandctl.expand(small_net(), "ck+fc", rate=2, seed=0), seed=1)
    contracted = expandctl.contract(expanded)
    reports = check_contraction(expanded, contracted, SHAPE)
    assert [(r.kind, r.dtype) for r in reports] == [
        ("expanded-vs-contracted", "float64"),
        ("expanded-vs-contracted", "float32"),
    ]
    assert all(r.passed for r in reports), [r.summary() for r in reports]
    assert (reports[0].samples, reports[0].batch) == (2, 2)
    with torch.no_grad():
        expanded.features[0].factors[1].weight.mul_(1.1)  # one factor 10% off
    algebra, stored = check_contraction(expanded, contracted, SHAPE)
    # float64 re-contracts the (float32) factors in float64: the algebra still holds; the float32
    # check compares the contracted weights that would be written, which no longer match.
    assert algebra.passed and "algebra check" in algebra.notes[-1]
    assert algebra.outputs[0].max_rel < 1e-12
    assert not stored.passed


def test_float64_contraction_meets_float64_tolerance():
    expanded = randomize_batchnorm(expandctl.expand(small_net().double(), "cl+fc", rate=2, seed=0), seed=1)
    contracted = expandctl.contract(expanded)
    (report,) = check_contraction(expanded, contracted, SHAPE, dtypes=(torch.float64,))
    assert report.passed and not report.notes
    assert (report.atol, report.rtol) == DEFAULT_TOLERANCES[torch.float64]
    assert report.outputs[0].max_rel < 1e-13
    with torch.no_grad():
        expanded.features[4].factors[1].weight[0, 0, 1, 1] += 1e-6  # below float32's resolution here
    (report,) = check_contraction(expanded, contracted, SHAPE, dtypes=(torch.float64,))
    assert not report.passed


def test_float32_parameters_get_float32_tolerance_even_in_float64():
    report = compare_models(nn.Linear(4, 2), nn.Linear(4, 2).double(), [4])
    assert (report.atol, report.rtol) == DEFAULT_TOLERANCES[torch.float32]
    assert "float32" in report.notes[0]


def test_tolerance_defaults_are_tight_and_ordered():
    (a64, r64), (a32, r32) = DEFAULT_TOLERANCES[torch.float64], DEFAULT_TOLERANCES[torch.float32]
    assert r64 <= 1e-9 and r32 <= 1e-3 and r64 < r32 and a64 < a32
    with pytest.raises(UsageError, match="float16"):
        compare_models(nn.Linear(4, 2), nn.Linear(4, 2), [4], dtype=torch.float16)


def test_check_contraction_refuses_an_uncontracted_model():
    expanded = expandctl.expand(small_net(), "ck+fc", rate=2, seed=0)
    with pytest.raises(UsageError, match="still has expanded layers"):
        check_contraction(expanded, expanded, SHAPE)


def test_bad_input_shape_is_a_usage_error():
    with pytest.raises(UsageError, match="input shape"):
        compare_models(nn.Linear(4, 2), nn.Linear(4, 2), [0, 4])


def test_check_finite_names_the_first_bad_tensor():
    model = small_net()
    check_finite(model)
    with torch.no_grad():
        model.classifier[1].weight[2, 3] = float("nan")
    with pytest.raises(UsageError, match=r"parameter 'classifier\.1\.weight' has 1 non-finite"):
        check_finite(model)
    clean = small_net()
    clean.features[1].running_var[0] = float("inf")
    with pytest.raises(UsageError, match=r"buffer 'features\.1\.running_var'"):
        check_finite(clean)
