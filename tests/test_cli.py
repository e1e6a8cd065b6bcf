"""The command-line tool: pipelines, --json output, exit codes and bad inputs.

In-process through Typer's CliRunner (fast), and the installed console script in a subprocess for
the torchvision pipeline of the issue's "done when" (smaller: 32x32 inputs, a few layers).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import CustomNet, Payload, randomize_batchnorm
from typer.testing import CliRunner

import expandctl
from expandctl import checkpoint as C
from expandctl.cli import app, main
from expandctl.models import SmallNet

SMALL = {"kernel_size": 5, "image_size": 8}
SMALL_JSON = json.dumps(SMALL)
runner = CliRunner()


def cli(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def cli_json(*args, code=0, env=None):
    result = cli(*args, "--json", env=env)
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # exactly one JSON object, nothing else on stdout
    data = json.loads(lines[0])
    assert data["ok"] is (code == 0)
    if code:
        assert data["exit_code"] == code
    return data


#: How the files fixture expands its SmallNet state dict (the pipeline test repeats it).
EXPAND_SMALLNET = (
    "--arch",
    "smallnet",
    "--arch-kwargs",
    SMALL_JSON,
    "--strategy",
    "ck+fc",
    "--rate",
    "2",
    "--seed",
    "0",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A compact SmallNet state dict and its expanded checkpoint (written by the CLI)."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    torch.save(randomize_batchnorm(SmallNet(**SMALL)).state_dict(), d / "sn.pt")
    result = cli("expand", d / "sn.pt", *EXPAND_SMALLNET, "-o", d / "x.pt")
    assert result.exit_code == 0, result.output
    return d


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------
def test_version():
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"expandctl {expandctl.__version__}"


def test_smallnet_pipeline_json(files, tmp_path):
    x = files / "x.pt"
    data = cli_json("expand", files / "sn.pt", *EXPAND_SMALLNET, "-o", tmp_path / "again.pt")
    assert data["command"] == "expand" and data["output"] == str(tmp_path / "again.pt")
    assert data["arch"] == {"spec": "expandctl.models:SmallNet", "kwargs": SMALL}
    assert data["input_shape"] == [3, 8, 8] and data["strategy"] == "ck+fc" and data["rate"] == 2
    assert data["expanded_layers"] == ["features.0", "features.4", "features.8", "classifier.1", "classifier.3"]
    assert data["params_after"] > data["params_before"] and data["plan"]["layers"]
    raw = torch.load(x, weights_only=True)
    assert raw["provenance"]["parent_sha256"] == C.sha256_file(files / "sn.pt")
    assert raw["provenance"]["command"].startswith("expandctl expand")

    onnx_path = tmp_path / "compact.onnx"
    data = cli_json("contract", x, "-o", onnx_path)
    assert data["format"] == "onnx" and not data["already_compact"] and len(data["contracted_layers"]) == 5
    kinds = [(c["kind"], c["dtype"]) for c in data["checks"]]
    assert kinds == [
        ("expanded-vs-contracted", "float64"),
        ("expanded-vs-contracted", "float32"),
        ("torch-vs-onnxruntime", "float32"),
    ]
    assert all(c["passed"] for c in data["checks"]) and data["params_after"] < data["params_before"]

    data = cli_json("verify", x, onnx_path)
    assert data["passed"] and data["files"] == [str(x), str(onnx_path)] and data["input_shape"] == [3, 8, 8]
    check = data["checks"][0]
    assert check["seed"] == 0 and check["samples"] == 4 and check["atol"] > 0 and check["rtol"] > 0
    assert check["outputs"][0]["max_abs"] < 1e-4

    info = cli_json("inspect", onnx_path)
    meta = info["metadata"]
    assert meta["expandctl.source_sha256"] == C.sha256_file(x)
    assert json.loads(meta["expandctl.plan"])["strategy"] == "ck+fc"
    assert meta["expandctl.version"] == expandctl.__version__
    assert info["inputs"]["input"][0] == "batch"  # dynamic batch by default

    human = cli("verify", onnx_path, x)  # either order: the torch model is the reference
    assert human.exit_code == 0 and "torch-vs-onnxruntime" in human.stdout and "passed" in human.stdout


def test_user_example_whole_pickled_resnet(tmp_path, monkeypatch):
    """The issue's example, exactly as written: a whole pickled torchvision model needs no --arch."""
    monkeypatch.chdir(tmp_path)
    torch.save(torchvision.models.resnet18(), "resnet.pt")
    result = cli("expand", "resnet.pt", "--strategy", "ck", "--rate", "4")
    assert result.exit_code == 0, result.output
    assert "wrote resnet.expanded.pt" in result.stdout
    ck = C.load_checkpoint("resnet.expanded.pt")
    assert ck.arch == "torchvision.models:resnet18" and ck.input_shape == (3, 224, 224)
    assert list(ck.layout) == ["conv1"] and ck.layout["conv1"]["kind"] == "ck"


def test_one_file_verify_inspect_and_export(files, tmp_path):
    x = files / "x.pt"
    data = cli_json("verify", x, "--samples", "1", "--batch", "1")
    assert [c["dtype"] for c in data["checks"]] == ["float64", "float32"] and data["passed"]
    data = cli_json("verify", x, "--dtype", "float64", "--samples", "1", "--seed", "7")
    assert len(data["checks"]) == 1 and data["checks"][0]["seed"] == 7

    info = cli_json("inspect", x)
    assert info["format"] == "expandctl" and info["format_version"] == 1
    assert info["arch"]["spec"] == "expandctl.models:SmallNet" and info["input_shape"] == [3, 8, 8]
    assert len(info["expanded_layers"]) == 5 and info["compact_params"] < info["params"]
    assert info["provenance"]["expandctl_version"] == expandctl.__version__
    human = cli("inspect", x)
    assert human.exit_code == 0 and "expanded layers" in human.stdout and "provenance" in human.stdout

    data = cli_json("export", x, "-o", tmp_path / "s.onnx", "--static-batch")
    assert data["dynamic_batch"] is False and data["checks"][-1]["kind"] == "torch-vs-onnxruntime"
    assert cli_json("inspect", tmp_path / "s.onnx")["inputs"]["input"][0] == 1


def test_fold_bn_contract_to_checkpoint(files, tmp_path):
    out = tmp_path / "folded.safetensors"
    data = cli_json("contract", files / "x.pt", "-o", out, "--fold-bn")
    assert len(data["folded_bn"]) == 3 and data["format"] == "safetensors"
    assert [c["kind"] for c in data["checks"]][-2:] == ["unfolded-vs-folded"] * 2
    model = expandctl.load(out)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert cli_json("inspect", out)["folded_bn"] == data["folded_bn"]
    assert cli_json("verify", files / "x.pt", out)["passed"]


def test_dry_run_and_default_outputs(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("expand", "--arch", "smallnet", "--arch-kwargs", SMALL_JSON, "--strategy", "cl", "--dry-run")
    assert result.exit_code == 0, result.output
    for text in ("features.0", "classifier.1", "not selected by the strategy", "nothing written"):
        assert text in result.stdout
    assert not list(tmp_path.iterdir())
    data = cli_json(
        "expand", "--arch", "smallnet", "--arch-kwargs", SMALL_JSON, "--dry-run", "--exclude", "classifier.*"
    )
    assert data["dry_run"] and data["expanded_layers"] == ["features.0", "features.4", "features.8"]
    assert not list(tmp_path.iterdir())

    result = cli("expand", "--arch", "smallnet", "--arch-kwargs", SMALL_JSON, "--seed", "1", "-q")
    assert result.exit_code == 0 and (tmp_path / "smallnet.expanded.pt").exists()
    (tmp_path / "c.pt").write_bytes((files / "sn.pt").read_bytes())
    result = cli("expand", "c.pt", "--arch", "smallnet", "--arch-kwargs", SMALL_JSON, "--init", "preserve")
    assert result.exit_code == 0 and (tmp_path / "c.expanded.pt").exists()
    assert cli_json("verify", "c.expanded.pt", "c.pt", "--arch", "smallnet", "--arch-kwargs", SMALL_JSON)["passed"]


def test_console_script_torchvision_pipeline(tmp_path):
    """The "done when" pipeline through the installed script, on resnet18 kept small for the test."""
    script = Path(sys.executable).parent / "expandctl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pt")

    def run(*args):
        return subprocess.run([str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    r = run(
        "expand",
        "r18.pt",
        "--arch",
        "resnet18",
        "--arch-kwargs",
        '{"num_classes":10}',
        "--strategy",
        "cl+fc",
        "--rate",
        "2",
        "--include",
        "layer1.*",
        "--include",
        "fc",
        "--input-shape",
        "3,32,32",
        "-o",
        "x.pt",
    )
    assert r.returncode == 0, r.stderr
    assert "wrote x.pt" in r.stdout and "\x1b[" not in r.stdout  # no terminal codes into a pipe
    r = run("contract", "x.pt", "-o", "compact.onnx", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] and len(json.loads(r.stdout)["contracted_layers"]) == 5
    r = run("verify", "x.pt", "compact.onnx", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passed"]
    r = run("verify", "missing.pt", "--json")  # an error through the script: JSON out, one line on stderr
    assert r.returncode == 2 and json.loads(r.stdout)["exit_code"] == 2
    assert r.stderr.strip().startswith("error:") and "missing.pt" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------------
# Errors and exit codes
# --------------------------------------------------------------------------------------------------
def _bad_files(d: Path) -> dict[str, Path]:
    (d / "junk.pt").write_bytes(b"this is not a checkpoint, just some text" * 10)
    data = (d / "sn.pt").read_bytes()
    (d / "cut.pt").write_bytes(data[: len(data) // 2])
    bad = SmallNet(**SMALL)
    with torch.no_grad():
        bad.classifier[1].weight[0, 0] = float("nan")
    torch.save(bad.state_dict(), d / "nan.pt")
    return {"junk": d / "junk.pt", "cut": d / "cut.pt", "nan": d / "nan.pt"}


@pytest.mark.parametrize(
    "case, code, needle",
    [
        ("missing", 2, "does not exist"),
        ("cut", 2, "truncated or corrupt"),
        ("junk", 2, "unknown format"),
        ("nofit", 2, "do not fit --arch"),
        ("noarch", 2, "plain state dict"),
        ("unknown_arch", 2, "unknown architecture"),
        ("bad_kwargs", 2, "--arch-kwargs is not valid JSON"),
        ("no_layer", 4, "selects no layer"),
        ("unknown_strategy", 2, "unknown strategy"),
        ("rate", 2, "rate must be >= 1"),
        ("nan", 2, "non-finite"),
        ("onnx_missing_dir", 2, "does not exist"),
        ("same_path", 2, "is the input file"),
        ("bad_shape", 2, "--input-shape"),
        ("bad_init", 2, "--init"),
    ],
)
def test_bad_input(files, tmp_path, case, code, needle):
    bad = _bad_files(files)
    sn, arch = files / "sn.pt", ["--arch", "smallnet", "--arch-kwargs", SMALL_JSON]
    args = {
        "missing": ["expand", tmp_path / "nope.pt", *arch],
        "cut": ["expand", bad["cut"], *arch],
        "junk": ["inspect", bad["junk"]],
        "nofit": ["expand", sn, "--arch", "resnet18"],
        "noarch": ["expand", sn],
        "unknown_arch": ["expand", sn, "--arch", "nosuchnet"],
        "bad_kwargs": ["expand", sn, "--arch", "smallnet", "--arch-kwargs", "{num_classes: 10"],
        "no_layer": ["expand", sn, *arch, "--strategy", "cl", "--include", "classifier.*"],
        "unknown_strategy": ["expand", sn, *arch, "--strategy", "ck+xx"],
        "rate": ["expand", sn, *arch, "--rate", "0.5"],
        "nan": ["expand", bad["nan"], *arch, "-o", tmp_path / "o.pt"],
        "onnx_missing_dir": ["contract", files / "x.pt", "-o", tmp_path / "no" / "dir" / "c.onnx"],
        "same_path": ["contract", files / "x.pt", "-o", files / "x.pt"],
        "bad_shape": ["verify", files / "x.pt", "--input-shape", "3,x,8"],
        "bad_init": ["expand", sn, *arch, "--init", "zeros"],
    }[case]
    before = sorted(p.name for p in files.iterdir())
    result = cli(*args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in result.stderr, result.stderr
    assert "Traceback" not in result.output
    data = cli_json(*args, code=code)
    assert needle in data["error"]
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written next to the inputs
    assert not list(tmp_path.iterdir())


def test_pickled_payload_refused_and_not_run(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, tmp_path / "evil.pt")
    for command in (["inspect"], ["expand", "--arch", "smallnet"], ["verify"]):
        result = cli(command[0], tmp_path / "evil.pt", *command[1:])
        assert result.exit_code == 3, result.output
        assert "builtins.exec" in result.stderr and "--trust-pickle" in result.stderr
    data = cli_json("inspect", tmp_path / "evil.pt", code=3)
    assert data["error_type"] == "UnsafeInputError"
    assert not marker.exists()


def test_custom_class_needs_trust(tmp_path):
    torch.save(CustomNet(), tmp_path / "custom.pt")
    result = cli("inspect", tmp_path / "custom.pt")
    assert result.exit_code == 3 and "helpers.CustomNet" in result.stderr
    data = cli_json("inspect", tmp_path / "custom.pt", env={"EXPANDCTL_TRUST_PICKLE": "1"})
    assert data["format"] == "pickled_module" and data["arch"]["spec"] == "helpers:CustomNet"
    assert cli_json("inspect", tmp_path / "custom.pt", "--trust-pickle")["params"] == 8
    # no input shape can be inferred for it: contract says what to pass
    expandctl.save(
        expandctl.expand(CustomNet(), "fc", 2), tmp_path / "e.pt", arch="helpers:CustomNet", input_shape=None
    )
    data = cli_json("contract", tmp_path / "e.pt", "-o", tmp_path / "c.pt", code=2)
    assert "--input-shape" in data["error"]
    data = cli_json("contract", tmp_path / "e.pt", "-o", tmp_path / "c.pt", "--input-shape", "3")
    assert data["input_shape"] == [3]


def test_contract_of_compact_checkpoint(files, tmp_path):
    compact = tmp_path / "compact.pt"
    expandctl.save(
        expandctl.load(files / "sn.pt", arch="smallnet", arch_kwargs=SMALL),
        compact,
        arch="smallnet",
        arch_kwargs=SMALL,
        input_shape=(3, 8, 8),
    )
    result = cli("contract", compact, "-o", tmp_path / "out.pt")
    assert result.exit_code == 0 and "already compact" in result.stderr
    assert (tmp_path / "out.pt").exists()
    data = cli_json("contract", compact, "-o", tmp_path / "out2.pt")
    assert data["already_compact"] and data["contracted_layers"] == []
    result = cli("verify", compact)
    assert result.exit_code == 2 and "no expanded layers" in result.stderr


def test_failed_check_exits_1_and_keeps_existing_output(files, tmp_path):
    out = tmp_path / "c.pt"
    out.write_bytes(b"previous")
    result = cli("contract", files / "x.pt", "-o", out, "--atol", "0", "--rtol", "0")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout and "nothing was written" in result.stderr
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["c.pt"]
    data = cli_json("contract", files / "x.pt", "-o", out, "--atol", "0", "--rtol", "0", code=1)
    assert data["passed"] is False and data["checks"][0]["outputs"][0]["max_abs"] > 0


def test_verify_mismatch_exits_1(files, tmp_path):
    other = tmp_path / "other.pt"
    assert (
        cli(
            "expand",
            files / "sn.pt",
            *["--arch", "smallnet", "--arch-kwargs", SMALL_JSON],
            "--rate",
            "2",
            "--seed",
            "1",
            "-o",
            other,
        ).exit_code
        == 0
    )
    data = cli_json("verify", files / "x.pt", other, "--samples", "1", code=1)
    assert data["passed"] is False and data["checks"][0]["kind"] == "torch-vs-torch"
    result = cli("verify", files / "x.pt", other, "--samples", "1")
    assert result.exit_code == 1 and "FAIL" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("error: outputs differ")


def test_verify_onnx_rejects_float64(files, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    result = cli("verify", files / "x.pt", tmp_path / "m.onnx", "--dtype", "float64")
    assert result.exit_code == 2 and "float32" in result.stderr


def test_inspect_plain_state_dict(files):
    data = cli_json("inspect", files / "sn.pt")
    assert data["format"] == "state_dict" and data["arch"] is None and data["tensors"] > 0
    data = cli_json("inspect", files / "sn.pt", "--arch", "smallnet", "--arch-kwargs", SMALL_JSON)
    assert data["format"] == "state_dict" and data["expanded_layers"] == []


def test_debug_shows_traceback(tmp_path):
    result = cli("inspect", tmp_path / "nope.pt", "--debug")
    assert result.exit_code == 2 and "Traceback" in result.stderr and "error:" in result.stderr


def test_main_reports_click_usage_errors_as_json(files, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["expandctl", "contract", str(files / "x.pt"), "--json"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["ok"] is False and "-o" in json.loads(out[0])["error"]
