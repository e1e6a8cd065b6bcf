"""`expandctl evaluate`: the same accuracy from the checkpoint in torch and from its ONNX file."""

import json

import pytest
import torch
from typer.testing import CliRunner

import expandctl
from expandctl.cli import app
from expandctl.data import load_data
from expandctl.evaluate import evaluate_onnx, evaluate_torch
from expandctl.export import export_onnx
from expandctl.models import SmallNet

KW = {"in_channels": 1, "image_size": 8, "num_classes": 10}


def test_torch_and_onnxruntime_agree_and_count_correctly(tmp_path):
    torch.manual_seed(0)
    model = SmallNet(kernel_size=3, **KW).eval()
    val = load_data("digits").val
    onnx_path, _ = export_onnx(model, tmp_path / "m.onnx", (1, 8, 8))
    a, b = evaluate_torch(model, val, batch_size=100), evaluate_onnx(onnx_path, val, batch_size=64)
    assert a["samples"] == b["samples"] == len(val) == 360
    assert a["correct"] == b["correct"]
    assert abs(a["loss"] - b["loss"]) < 1e-4
    with torch.no_grad():
        x, y = val[list(range(len(val)))]
        expected = int((model(x).argmax(1) == y).sum())
    assert a["correct"] == expected and a["accuracy"] == expected / 360


def test_evaluate_command_json(tmp_path):
    model = expandctl.expand(SmallNet(kernel_size=5, **KW), strategy="ck", rate=2, seed=0)
    path = tmp_path / "e.pt"
    with pytest.raises(expandctl.UsageError, match="does not fit its ck layout"):  # kernel_size missing
        expandctl.save(model, path, arch="smallnet", arch_kwargs=KW, input_shape=(1, 8, 8))
    expandctl.save(model, path, arch="smallnet", arch_kwargs={**KW, "kernel_size": 5}, input_shape=(1, 8, 8))
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(path), "--data", "digits", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["ok"] and out["samples"] == 360 and 0 <= out["accuracy"] <= 1 and out["runtime"] == "torch"
    res = runner.invoke(app, ["evaluate", str(path), "--data", "digits", "--split", "test", "--json"])
    assert res.exit_code == 2 and "split" in json.loads(res.stdout)["error"]
    res = runner.invoke(app, ["evaluate", str(tmp_path / "missing.pt"), "--data", "digits"])
    assert res.exit_code == 2
