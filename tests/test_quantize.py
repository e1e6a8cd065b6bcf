"""``expandctl quantize``: the accuracy gate, the metadata, bad inputs, the calibration draw.

The models are nearest-class-mean classifiers on the synthetic set (set, not trained: instant). The
"lossy" one carries a hidden unit with a huge constant activation that its logits ignore: float
accuracy is unchanged, but INT8's per-tensor scale for that activation erases the class signal.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from helpers import ProtoNet, fit_prototypes
from typer.testing import CliRunner

import expandctl
from expandctl.cli import app
from expandctl.data import load_data
from expandctl.errors import UsageError
from expandctl.export import export_onnx
from expandctl.quantize import calibration_indices, quantized_ops

DATA = "synthetic:1x8x8"
SHAPE = (1, 8, 8)
runner = CliRunner()


def cli_json(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == code, (result.stdout, result.stderr)
    (line,) = result.stdout.strip().splitlines()  # one JSON object on stdout, also on error
    data = json.loads(line)
    assert data["ok"] is (code == 0)
    return data, result


def proto_net(outlier: float = 0.0) -> ProtoNet:
    train = load_data(DATA, augment=False).train
    return fit_prototypes(ProtoNet(64, 10, outlier), train.images, train.labels)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    export_onnx(proto_net(), d / "good.onnx", SHAPE)
    export_onnx(proto_net(outlier=1e5), d / "lossy.onnx", SHAPE)
    return d


def files_in(d):
    return sorted(p.name for p in d.iterdir())


def test_a_passing_gate_writes_the_file_with_the_report_and_metadata(models, tmp_path):
    out = tmp_path / "good.int8.onnx"
    options = ["--calib-size", "100", "--calibration", "entropy", "--seed", "3", "--latency-rounds", "5"]
    data, _ = cli_json("quantize", models / "good.onnx", "--data", DATA, "-o", out, "--max-drop", "1.0", *options)
    assert files_in(tmp_path) == ["good.int8.onnx"]
    assert data["passed"] and data["output"] == str(out) and data["max_drop"] == 1.0
    f, q = data["float_eval"], data["int8_eval"]
    assert f["samples"] == q["samples"] == 128 and f["accuracy"] > 0.9
    assert data["drop_points"] == pytest.approx(100 * (f["accuracy"] - q["accuracy"])) and data["drop_points"] <= 1.0
    assert data["latency"]["ratio"] == pytest.approx(data["latency"]["int8_ms"] / data["latency"]["float_ms"])
    assert data["latency"]["rounds"] == 5 and data["latency"]["batch"] == 32 and data["latency"]["ratio_min"] > 0
    assert data["float_bytes"] == (models / "good.onnx").stat().st_size and data["int8_bytes"] == out.stat().st_size
    cal = data["calibration"]
    assert (cal["size"], cal["method"], cal["seed"], cal["data"]) == (100, "entropy", 3, DATA)
    assert cal["per_class"] == [10] * 10  # the synthetic split is balanced: stratified = 10 per class

    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["expandctl.calibration"]) == {"data": DATA, "size": 100, "method": "entropy", "seed": 3}
    assert float(meta["expandctl.float_accuracy"]) == pytest.approx(f["accuracy"])
    assert float(meta["expandctl.int8_accuracy"]) == pytest.approx(q["accuracy"])
    assert json.loads(meta["expandctl.quantization"])["format"] == "QDQ"
    assert meta["expandctl.exporter"] == "dynamo"  # the float file's provenance is kept
    ops = quantized_ops(out)
    assert ops.get("QuantizeLinear") and ops.get("DequantizeLinear")
    assert quantized_ops(models / "good.onnx") == {}


def test_a_failing_gate_exits_1_and_writes_nothing(models, tmp_path):
    out = tmp_path / "lossy.int8.onnx"
    data, result = cli_json("quantize", models / "lossy.onnx", "--data", DATA, "-o", out, "--max-drop", "1.0",
                            "--calib-size", "64", "--latency-rounds", "2", code=1)  # fmt: skip
    assert files_in(tmp_path) == []  # no output, no temporary file left beside it
    assert data["exit_code"] == 1 and data["error_type"] == "CheckFailed"
    assert "more than --max-drop 1" in data["error"] and "nothing was written" in data["error"]
    assert not data["passed"] and data["drop_points"] > 50 and data["float_eval"]["accuracy"] > 0.9
    # The same model without a gate is written: the gate, not the quantization, refused it.
    data, _ = cli_json("quantize", models / "lossy.onnx", "--data", DATA, "-o", out, "--calib-size", "64",
                       "--latency-rounds", "2")  # fmt: skip
    assert out.is_file() and data["passed"] and data["max_drop"] is None


def test_a_checkpoint_is_contracted_and_exported_first(tmp_path):
    model = expandctl.expand(proto_net(), "fc", 2, init="preserve")
    expandctl.save(model, tmp_path / "x.pt", arch="helpers:ProtoNet", arch_kwargs={}, input_shape=SHAPE)
    data, _ = cli_json("quantize", tmp_path / "x.pt", "--data", DATA, "-o", tmp_path / "x.int8.onnx",
                       "--max-drop", "1", "--latency-rounds", "2")  # fmt: skip
    assert data["passed"] and data["float_eval"]["accuracy"] > 0.9 and data["input_shape"] == list(SHAPE)
    assert files_in(tmp_path) == ["x.int8.onnx", "x.pt"]  # the float export stayed in a temporary folder
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "x.int8.onnx")).metadata_props}
    assert meta["expandctl.source"] == "x.pt"


@pytest.mark.parametrize(
    "case, message",
    [
        ("quantized", "is already quantized"),
        ("onnx-shape", "takes 1x8x8 inputs but --data synthetic:3x8x8 gives 3x8x8"),
        ("ckpt-shape", "takes 1x8x8 inputs but --data synthetic:3x8x8 gives 3x8x8"),
        ("classes", "has 5 outputs but the data set has 10 classes"),
        ("empty", "calibration set is empty"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(models, tmp_path, case, message):
    src, data, extra = models / "good.onnx", DATA, []
    if case == "quantized":
        src = tmp_path / "q.onnx"
        cli_json("quantize", models / "good.onnx", "--data", DATA, "-o", src, "--latency-rounds", "1")
    elif case == "onnx-shape":
        data = "synthetic:3x8x8"
    elif case == "ckpt-shape":
        src, data = tmp_path / "p.pt", "synthetic:3x8x8"
        expandctl.save(ProtoNet(), src, arch="helpers:ProtoNet", arch_kwargs={}, input_shape=SHAPE)
    elif case == "classes":
        src = tmp_path / "five.onnx"
        export_onnx(ProtoNet(64, 5), src, SHAPE)
    else:
        extra = ["--calib-size", "0"]
    before = files_in(tmp_path)
    out, result = cli_json("quantize", src, "--data", data, "-o", tmp_path / "out.onnx", *extra, code=2)
    assert message in out["error"], out["error"]
    assert files_in(tmp_path) == before
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:")


def test_calibration_draw_is_stratified_and_seeded():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    idx = calibration_indices(labels, 100, seed=5)
    assert torch.bincount(labels[idx]).tolist() == [60, 30, 10]  # each class in proportion
    assert len(set(idx.tolist())) == 100 and idx.tolist() == sorted(idx.tolist())
    assert torch.equal(idx, calibration_indices(labels, 100, seed=5))  # same seed, same images
    assert not torch.equal(idx, calibration_indices(labels, 100, seed=6))
    assert torch.equal(calibration_indices(labels, 5000), torch.arange(1000))  # more than there is: all
    with pytest.raises(UsageError, match="calibration set is empty"):
        calibration_indices(labels, 0)
    with pytest.raises(UsageError, match="training split has no images"):
        calibration_indices(torch.tensor([], dtype=torch.long), 10)


def test_a_dynamic_size_file_is_calibrated_and_scored_at_the_data_size(tmp_path):
    from helpers import PoolNet

    export_onnx(PoolNet(), tmp_path / "pool.onnx", SHAPE, dynamic_size=True)
    data, _ = cli_json("quantize", tmp_path / "pool.onnx", "--data", "synthetic:1x12x12", "-o", tmp_path / "q.onnx",
                       "--calib-size", "20", "--latency-rounds", "1")  # fmt: skip
    assert data["input_shape"] == [1, 12, 12] and data["int8_eval"]["samples"] == 128
    data, _ = cli_json("quantize", tmp_path / "pool.onnx", "--data", "synthetic:3x12x12", "-o", tmp_path / "r.onnx",
                       code=2)  # fmt: skip
    assert "takes 1x12x12 inputs but --data synthetic:3x12x12 gives 3x12x12" in data["error"]
    assert not (tmp_path / "r.onnx").exists()


def test_entropy_calibration_clips_where_minmax_does_not(models, tmp_path):
    """Through quantize_static alone, onnxruntime's entropy method has as many histogram bins as
    quantized bins and so returns min-max's ranges; expandctl calibrates it with 2048 bins."""
    from onnx import numpy_helper

    from expandctl.quantize import quantize_onnx

    sets = load_data(DATA, augment=False)
    idx = calibration_indices(sets.train.labels, 128, seed=0)
    scales = {}
    for method in ("minmax", "entropy"):
        quantize_onnx(models / "good.onnx", tmp_path / f"{method}.onnx", sets.train, idx, method)
        proto = onnx.load(str(tmp_path / f"{method}.onnx"))
        scales[method] = {
            t.name: float(numpy_helper.to_array(t))
            for t in proto.graph.initializer
            if t.name.endswith("_scale") and numpy_helper.to_array(t).size == 1
        }
    assert scales["minmax"].keys() == scales["entropy"].keys()
    assert any(scales["entropy"][k] < 0.9 * scales["minmax"][k] for k in scales["minmax"]), scales


def test_a_static_batch_file_is_calibrated_and_timed_at_its_batch_size(tmp_path):
    export_onnx(proto_net(), tmp_path / "static.onnx", SHAPE, dynamic_batch=False)
    for method in ("minmax", "percentile"):
        data, _ = cli_json("quantize", tmp_path / "static.onnx", "--data", DATA, "-o", tmp_path / f"{method}.onnx",
                           "--calibration", method, "--calib-size", "30", "--latency-rounds", "2")  # fmt: skip
        assert data["latency"]["batch"] == 1 and data["int8_eval"]["accuracy"] > 0.9


@pytest.mark.skipif(shutil.which("jq") is None, reason="examples/int8_gate.sh needs jq (apt-get install -y jq)")
def test_the_ci_gate_script_passes_a_good_model_and_refuses_one_below_the_bar(tmp_path):
    """The README's CI-style script: train on digits, contract, quantize with --max-drop 1.0 (exit 0, a
    file), then --min-accuracy one point above what INT8 scores on the same model (exit 1, no file)."""
    root = Path(__file__).resolve().parents[1]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this venv's expandctl first
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(root / "examples" / "int8_gate.sh"), str(tmp_path / "gate")], env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "INT8 passed the gate" in run.stdout and "refused (exit 1)" in run.stdout and "gate ok" in run.stdout
    assert (tmp_path / "gate" / "compact.int8.onnx").stat().st_size > 0
    assert not (tmp_path / "gate" / "strict.int8.onnx").exists()
    refused = json.loads((tmp_path / "gate" / "strict.json").read_text())
    assert refused["exit_code"] == 1 and "--min-accuracy" in refused["error"]


# --- the library verb behind the command (issue 28) -----------------------------------------------
def test_the_quantize_verb_returns_the_commands_json_object(models, tmp_path):
    from expandctl.workflows.quantize import QuantizeOptions, quantize_model

    cli, _ = cli_json("quantize", models / "good.onnx", "--data", DATA, "-o", tmp_path / "a.onnx", "--calib-size", 32,
                      "--latency-rounds", 1)  # fmt: skip
    lib = quantize_model(
        str(models / "good.onnx"),
        QuantizeOptions(data=DATA, output=str(tmp_path / "b.onnx"), calib_size=32, latency_rounds=1),
    ).to_dict()
    timing = ("latency", "output")  # measured each time; the file names differ
    assert {k: v for k, v in lib.items() if k not in timing} == {
        k: v for k, v in cli.items() if k not in (*timing, "ok", "command")
    }
    assert lib.keys() == cli.keys() - {"ok", "command"} and lib["output"] == str(tmp_path / "b.onnx")


@pytest.mark.parametrize(
    "kw, option, flag_message",
    [
        ({"calibration": "x"}, "calibration", "--calibration must be one of minmax, entropy, percentile, not 'x'"),
        ({"calib_size": 0}, "calib_size", "the calibration set is empty (--calib-size 0); give at least 1 image"),
        ({"max_drop": -1.0}, "max_drop", "--max-drop must be a number of percentage points >= 0, not -1"),
        ({"latency_batch": 0}, "latency_batch", "--latency-batch must be at least 1"),
    ],
)
def test_quantize_errors_name_the_parameter_and_the_cli_its_flag(models, tmp_path, kw, option, flag_message):
    from expandctl.workflows.quantize import QuantizeOptions

    with pytest.raises(UsageError) as e:
        QuantizeOptions(data=DATA, output=str(tmp_path / "x.onnx"), **kw)
    assert e.value.option == option and "--" not in str(e.value)
    flag = "--" + option.replace("_", "-")
    data, _ = cli_json("quantize", models / "good.onnx", "--data", DATA, "-o", tmp_path / "x.onnx", flag,
                       next(iter(kw.values())), code=2)  # fmt: skip
    assert data["error"] == flag_message
