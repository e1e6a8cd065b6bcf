"""``export`` / ``contract --dynamic-size``: symbolic image sizes in the ONNX graph, checked at two sizes;
a model with a fixed-size layer (SmallNet's Linear after a flatten) is refused before anything is written."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import PoolNet, SegNet, randomize_batchnorm
from typer.testing import CliRunner

import expandctl
from expandctl.cli import app
from expandctl.errors import UnsupportedError
from expandctl.export import export_onnx
from expandctl.models import SmallNet

runner = CliRunner()


def cli_json(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == code, (result.stdout, result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def input_dims(path) -> list:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def assert_runs_like_torch(model, path, shapes):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in shapes:
        x = torch.randn(2, *shape)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = model.eval()(x).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4, shape


def test_a_segmentation_model_runs_at_any_size(tmp_path):
    model = SegNet()
    path, report = export_onnx(model, tmp_path / "seg.onnx", (3, 16, 16), dynamic_size=True)
    assert input_dims(path) == ["batch", 3, "height", "width"]
    assert report.passed and "output[size=3x32x32]" in [o.name for o in report.outputs]
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["expandctl.input_shape"]) == [3, 16, 16]
    assert json.loads(meta["expandctl.dynamic_size"]) == ["height", "width"]
    assert_runs_like_torch(model, path, [(3, 16, 16), (3, 24, 40), (3, 9, 13)])  # the output follows the input


def test_a_one_dimensional_model_gets_a_symbolic_length(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten())
    path, report = export_onnx(model, tmp_path / "1d.onnx", (2, 20), dynamic_size=True, dynamic_batch=False)
    assert input_dims(path) == [1, 2, "length"] and report.passed
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 2, 57)
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - model(x).detach().numpy()).max() < 1e-5


def test_a_fixed_size_layer_is_refused_before_writing(tmp_path):
    with pytest.raises(UnsupportedError, match="runs at 1x8x8 but not at 1x16x16.*fixed-size layer.*Linear after"):
        export_onnx(SmallNet(in_channels=1, image_size=8), tmp_path / "sn.onnx", (1, 8, 8), dynamic_size=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_and_verify_at_two_sizes(tmp_path):
    torch.manual_seed(0)
    model = expandctl.expand(randomize_batchnorm(PoolNet()), "cl", 2, init="preserve")  # contracted on export
    expandctl.save(model, tmp_path / "pool.pt", arch="helpers:PoolNet", arch_kwargs={}, input_shape=(1, 8, 8))
    data = cli_json("export", tmp_path / "pool.pt", "-o", tmp_path / "pool.onnx", "--dynamic-size")
    assert data["dynamic_size"] and data["passed"]
    assert input_dims(tmp_path / "pool.onnx") == ["batch", 1, "height", "width"]
    data = cli_json("verify", tmp_path / "pool.pt", tmp_path / "pool.onnx")
    assert data["passed"] and data["input_shape"] == [1, 8, 8]  # from the file's metadata: its graph has none
    assert [o["name"] for o in data["checks"][0]["outputs"]] == ["output", "output[size=1x16x16]"]

    # SmallNet flattens into a Linear: both commands refuse it (exit 4) and write nothing.
    expandctl.save(SmallNet(in_channels=1, image_size=8), tmp_path / "sn.pt", arch="smallnet",
                   arch_kwargs={"in_channels": 1, "image_size": 8}, input_shape=(1, 8, 8))  # fmt: skip
    before = sorted(p.name for p in tmp_path.iterdir())
    for command in ("export", "contract"):
        data = cli_json(command, tmp_path / "sn.pt", "-o", tmp_path / "sn.onnx", "--dynamic-size", code=4)
        assert "fixed-size layer" in data["error"]
    data = cli_json("contract", tmp_path / "sn.pt", "-o", tmp_path / "sn2.pt", "--dynamic-size", code=2)
    assert "--dynamic-size shapes an ONNX graph" in data["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
