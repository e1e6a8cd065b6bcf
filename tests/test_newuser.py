"""What a new user hit (issue 11): shape mismatches, verify's input shape, user modules, CI strictness,
small CLI points. In-process through CliRunner, on SmallNets and a user's module written to tmp_path."""

import json
import sys

import pytest
import torch
import torch.nn as nn
from helpers import randomize_batchnorm
from typer.testing import CliRunner

from expandctl import checkpoint as C
from expandctl.cli import app, main
from expandctl.errors import UsageError
from expandctl.models import SmallNet

runner = CliRunner()
RGB = {"kernel_size": 5}  # 3x32x32
GRAY = {"kernel_size": 5, "in_channels": 1, "image_size": 8}  # 1x8x8, the digits shape


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def cli_json(*args, code=0):
    result = cli(*args, "--json")
    assert result.exit_code == code, (result.stdout, result.stderr)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["ok"] is (code == 0)
    return data


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Expanded 3x32x32 and 1x8x8 SmallNets and their contracted ONNX files."""
    d = tmp_path_factory.mktemp("newuser")
    for name, kwargs in (("rgb", RGB), ("gray", GRAY)):
        r = cli("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(kwargs), "--seed", "0",
                "--rate", "2", "-o", d / f"{name}.pt", "-q")  # fmt: skip
        assert r.exit_code == 0, r.output
        r = cli("contract", d / f"{name}.pt", "-o", d / f"{name}.onnx", "-q")
        assert r.exit_code == 0, r.output
    return d


# --------------------------------------------------------------------------------------------------
# 1. Shape mismatches: exit 2, both shapes, the backend's whole message
# --------------------------------------------------------------------------------------------------
def test_evaluate_onnx_on_data_of_another_shape_is_a_usage_error(models):
    data = cli_json("evaluate", models / "rgb.onnx", "--data", "digits", code=2)
    assert data["error_type"] == "UsageError"
    assert "3x32x32" in data["error"] and "1x8x8" in data["error"]
    assert "--channels 3 --image-size 32" in data["error"]


def test_evaluate_checkpoint_on_data_of_another_shape_shows_torch_whole_message(models):
    data = cli_json("evaluate", models / "rgb.pt", "--data", "digits", code=2)
    assert "3x32x32" in data["error"] and "1x8x8" in data["error"]
    assert "to have 3 channels, but got 1 channels" in data["error"]  # torch's message, not only its first line
    assert "internal error" not in data["error"]


def test_analyze_on_data_of_another_shape_is_a_usage_error(models, tmp_path):
    data = cli_json("analyze", "grad-confusion", models / "rgb.pt", "--data", "digits", "--pairs", "2",
                    "-o", tmp_path / "gc.png", "--device", "cpu", code=2)  # fmt: skip
    assert "3x32x32" in data["error"] and "1x8x8" in data["error"] and "--channels 3 --image-size 32" in data["error"]


def test_adapters_make_the_same_evaluation_work(models):
    data = cli_json("evaluate", models / "rgb.onnx", "--data", "digits", "--channels", "3", "--image-size", "32")
    assert data["samples"] == 360 and 0 <= data["accuracy"] <= 1


def test_verify_against_onnx_of_another_shape_is_exit_2_not_a_nan_check(models):
    result = cli("verify", models / "rgb.pt", models / "gray.onnx")
    assert result.exit_code == 2, result.output
    assert "nan" not in result.output.lower() and "1, 8, 8" in result.stderr and "3x32x32" in result.stderr


def test_verify_onnx_static_shape_is_checked_before_running(models):
    from expandctl.verify import compare_onnx

    model = C.load(models / "rgb.pt")
    with pytest.raises(UsageError, match=r"takes inputs of shape batchx3x32x32 but the check feeds 2x1x8x8"):
        compare_onnx(model, models / "rgb.onnx", (1, 8, 8))


def test_verify_two_checkpoints_of_different_models_names_both_shapes(models):
    data = cli_json("verify", models / "rgb.pt", models / "gray.pt", code=2)
    assert "3x32x32" in data["error"] and "1x8x8" in data["error"] and "not two forms of one model" in data["error"]


def test_expand_runs_the_model_once_on_the_input_shape(tmp_path):
    out = tmp_path / "wrong.pt"
    data = cli_json("expand", "--arch", "smallnet", "--input-shape", "1,28,28", "-o", out, code=2)
    assert "1x28x28" in data["error"] and "3 channels" in data["error"] and not out.exists()


def test_contract_with_a_wrong_input_shape_names_the_recorded_one(models, tmp_path):
    data = cli_json("contract", models / "rgb.pt", "-o", tmp_path / "c.pt", "--input-shape", "1,8,8", code=2)
    assert "its file records 3x32x32" in data["error"] and "3 channels" in data["error"]


# --------------------------------------------------------------------------------------------------
# 2. verify CKPT ONNX takes the input shape from the ONNX file; 3. module:callable from the current folder
# --------------------------------------------------------------------------------------------------
USER_MODULE = """
import torch.nn as nn


class MyNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))
"""


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A user's folder with their own module (a name nothing else uses), as the current folder;
    ``fresh()`` forgets the import and sys.path entry, as a new process would."""
    name = f"mymodels_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    saved = list(sys.path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])

    def fresh():
        sys.modules.pop(name, None)
        sys.path[:] = [p for p in saved if p not in ("", ".", str(tmp_path))]

    yield tmp_path, f"{name}:MyNet", fresh
    sys.modules.pop(name, None)


def test_user_module_imports_from_the_current_folder_in_every_command(user_folder):
    folder, spec, fresh = user_folder
    fresh()
    data = cli_json("expand", "--arch", spec, "--input-shape", "1,12,12", "--strategy", "ck+fc", "-o", "best.pt")
    assert data["arch"]["spec"] == spec
    fresh()
    assert cli_json("inspect", "best.pt")["arch"]["spec"] == spec
    fresh()
    data = cli_json("contract", "best.pt", "-o", "w.onnx", "--input-shape", "1,16,16")
    assert data["input_shape"] == [1, 16, 16]
    fresh()
    # 2: no --input-shape: the ONNX file's (1,16,16), not the checkpoint's (1,12,12)
    data = cli_json("verify", "best.pt", "w.onnx")
    assert data["passed"] and data["input_shape"] == [1, 16, 16]


def test_a_module_that_is_nowhere_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = cli_json("expand", "--arch", "no_such_user_module_xyz:Net", code=2)
    for words in ("cannot import 'no_such_user_module_xyz'", "from the folder that holds", "PYTHONPATH", "install"):
        assert words in data["error"]


# --------------------------------------------------------------------------------------------------
# 4. contract --require-expanded
# --------------------------------------------------------------------------------------------------
def test_contract_require_expanded_fails_on_a_compact_checkpoint(models, tmp_path):
    compact = tmp_path / "compact.pt"
    assert cli_json("contract", models / "gray.pt", "-o", compact)["already_compact"] is False
    out = tmp_path / "again.pt"
    data = cli_json("contract", compact, "-o", out, "--require-expanded", code=4)
    assert "no expanded layer" in data["error"] and not out.exists()
    assert cli_json("contract", compact, "-o", out)["already_compact"] is True  # without the flag: as documented


# --------------------------------------------------------------------------------------------------
# 6. Smaller points
# --------------------------------------------------------------------------------------------------
def test_click_usage_errors_under_json_have_command_and_error_type(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["expandctl", "quantize", "x.onnx", "--json"])  # no --data, no -o
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    data = json.loads(capsys.readouterr().out.strip())
    assert data["command"] == "quantize" and data["error_type"] == "MissingParameter" and data["exit_code"] == 2


@pytest.mark.parametrize(
    "command, usage",
    [(["contract"], "contract [OPTIONS] SRC"), (["train"], "train [OPTIONS] SRC"),
     (["verify"], "verify [OPTIONS] A [B]"), (["analyze", "landscape"], "landscape [OPTIONS] CKPT")],
)  # fmt: skip
def test_usage_lines_name_required_arguments_plainly(command, usage):
    result = cli(*command)
    assert result.exit_code == 2
    line = next(x for x in result.output.splitlines() if x.startswith("Usage:"))
    assert line.endswith(usage) and "{" not in line


def test_plan_shows_groups_of_depthwise_factors():
    from expandctl.rewrite import plan

    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16))
    entry = plan(model, "cl", 4).expanded[0]
    assert entry.factors == ["16->64 1x1 g16", "64->64 3x3 g16", "64->16 1x1 g16"]


def test_inspect_state_dict_counts_parameters_not_buffers(tmp_path):
    model = randomize_batchnorm(SmallNet(**GRAY))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    data = cli_json("inspect", tmp_path / "sd.pt")
    assert data["parameters"] == sum(p.numel() for p in model.parameters())
    assert data["buffers"] == sum(b.numel() for b in model.buffers())


def test_inspect_onnx_says_why_its_parameter_count_differs(models):
    result = cli("inspect", models / "rgb.onnx")
    assert result.exit_code == 0 and "folds eval-mode BatchNorm" in result.stderr
    assert "BatchNorm" in cli_json("inspect", models / "rgb.onnx")["parameters_note"]


def test_include_matching_nothing_blames_the_pattern(tmp_path):
    data = cli_json("expand", "--arch", "smallnet", "--include", "nomatch*", "-o", tmp_path / "n.pt", code=4)
    assert "--include 'nomatch*' matches none of the 5 candidate layers" in data["error"]
    assert "strategy" not in data["error"].split(";")[0]


def test_demo_ends_with_a_comparison_over_seeds_and_what_it_shows():
    """Issue 11 asked the demo to say what its numbers mean; issue 18 that its comparison be the
    evidence's kind (several seeds, mean +- std, CK at 7x7), not one seed of each."""
    from pathlib import Path

    script = (Path(__file__).parent.parent / "examples" / "demo.sh").read_text()
    tail = script[script.rindex("reproduce.py") :]  # after the comparison's runs
    assert "python" not in tail and "expandctl " not in tail  # nothing else runs after the table
    compare = script[script.index("compare=(") : script.index("\n", script.index("compare=("))]
    assert "--variants compact,ck " in compare and "--kernels 7" in compare
    assert script.count("--seeds") >= 3 and "seeds=${DEMO_SEEDS:-0,1,2,3,4}" in script
    for words in ("What this shows", "360 held-out digits", "mean +- std over the seeds", "results/",
                  "not evidence either way"):  # fmt: skip
        assert words in tail


def test_library_expand_with_include_matching_nothing_blames_the_pattern():
    from expandctl.errors import NothingToExpandError
    from expandctl.rewrite import expand

    with pytest.raises(NothingToExpandError, match=r"--include 'nomatch\*' matches none of the 5 candidate layers"):
        expand(SmallNet(), "ck+fc", 2, include=["nomatch*"])


def test_resolve_arch_imports_a_module_from_the_current_folder(user_folder):
    from expandctl.models import build_arch

    _, spec, fresh = user_folder
    fresh()
    assert type(build_arch(spec)).__name__ == "MyNet"
