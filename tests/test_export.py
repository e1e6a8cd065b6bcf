import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from helpers import randomize_batchnorm

import expandctl
import expandctl.export as export_mod
from expandctl.errors import CheckFailed, UsageError
from expandctl.export import export_onnx
from expandctl.models import SmallNet
from expandctl.verify import OutputCheck, Report, compare_onnx

SHAPE = [3, 8, 8]


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(SmallNet(kernel_size=5, channels=(4, 8), hidden=8, image_size=8), seed)


def ort_run(path, x: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def batch_dim(path) -> onnx.TensorShapeProto.Dimension:
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    model = small_net().train()  # exported (and checked) in eval mode regardless
    path = tmp_path_factory.mktemp("dyn") / "net.onnx"
    out, report = export_onnx(model, path, SHAPE, metadata={"arch": "smallnet", "rate": "2"})
    return model, out, report


def test_dynamic_export_is_checked_valid_and_single_file(dynamic_export):
    model, path, report = dynamic_export
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["net.onnx"]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["arch"] == "smallnet" and meta["rate"] == "2"
    assert meta["expandctl.exporter"] == "dynamo" and meta["expandctl.version"] == expandctl.__version__
    assert batch_dim(path).dim_param == "batch"
    assert model.training  # the caller's model is untouched
    assert report.passed and report.kind == "torch-vs-onnxruntime" and report.dtype == "float32"
    assert [o.name for o in report.outputs] == ["output", "output[batch=3]"]
    json.dumps(report.to_dict())


def test_onnxruntime_matches_torch_at_other_batch_sizes(dynamic_export):
    model, path, _ = dynamic_export
    reference = copy.deepcopy(model).eval()
    for batch in (2, 3, 5):
        x = torch.randn(batch, *SHAPE)
        (got,) = ort_run(path, x)
        with torch.no_grad():
            assert np.abs(got - reference(x).numpy()).max() < 1e-5


def test_compare_onnx_detects_a_different_model(dynamic_export):
    _, path, _ = dynamic_export
    report = compare_onnx(small_net(seed=1), path, SHAPE)
    assert not report.passed and report.outputs[0].max_rel > 1e-2


def test_static_export_fixes_the_batch_dimension(tmp_path):
    path, report = export_onnx(small_net(), tmp_path / "static.onnx", SHAPE, dynamic_batch=False)
    assert batch_dim(path).dim_value == 1
    assert report.passed and report.batch == 1 and len(report.outputs) == 1
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        ort_run(path, torch.randn(3, *SHAPE))
    # Another batch size is a wrong input shape (exit 2, before running), not a failed numeric check.
    with pytest.raises(UsageError, match=r"takes inputs of shape 1x3x8x8 but the check feeds 3x3x8x8.*--batch 1"):
        compare_onnx(small_net(), path, SHAPE, batch=3)


def test_missing_directory_is_a_usage_error(tmp_path):
    missing = tmp_path / "nope" / "deeper"
    with pytest.raises(UsageError, match="deeper"):
        export_onnx(small_net(), missing / "net.onnx", SHAPE)


def test_failed_check_leaves_no_file(tmp_path, monkeypatch):
    failing = Report(
        "torch-vs-onnxruntime", "float32", 1e-6, 1e-4, 0, 4, 2, SHAPE, [OutputCheck("output", 0.5, 0.5, False)]
    )
    monkeypatch.setattr(export_mod, "compare_onnx", lambda *a, **k: failing)
    path = tmp_path / "net.onnx"
    path.write_bytes(b"previous good file")
    with pytest.raises(CheckFailed, match="max_abs 0.5") as info:
        export_onnx(small_net(), path, SHAPE)
    assert info.value.exit_code == 1 and info.value.report is failing
    assert path.read_bytes() == b"previous good file"  # neither replaced nor removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]  # no temp files left


def test_dynamo_failure_falls_back_to_torchscript_and_says_so(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_breaks(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated torch.export failure")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    path, report = export_onnx(small_net(), tmp_path / "ts.onnx", SHAPE)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["expandctl.exporter"] == "torchscript"
    assert "simulated torch.export failure" in meta["expandctl.export_notes"]
    assert any("simulated torch.export failure" in n for n in report.notes)
    assert report.passed and len(report.outputs) == 2  # the dynamic batch still holds at size 3
    assert batch_dim(path).dim_param == "batch"


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.body(x).mean((2, 3))
        return {"logits": self.head(y), "features": y}


def test_expanded_dict_output_model_exports_with_named_outputs(tmp_path):
    model = expandctl.expand(TwoHeads(), "cl+fc", rate=2, seed=0)
    path, report = export_onnx(model, tmp_path / "heads.onnx", SHAPE)
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["output.logits", "output.features"]
    assert report.passed and [o.name for o in report.outputs][:2] == ["output.logits", "output.features"]


def test_weights_beyond_the_single_file_limit_go_to_a_side_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "SINGLE_FILE_LIMIT", 0)
    path, report = export_onnx(small_net(), tmp_path / "big.onnx", SHAPE)
    assert report.passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    x = torch.randn(2, *SHAPE)
    (got,) = ort_run(path, x)
    with torch.no_grad():
        assert np.abs(got - small_net().eval()(x).numpy()).max() < 1e-5
