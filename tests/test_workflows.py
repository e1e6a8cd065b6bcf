"""expand and contract as library functions (expandctl.workflows): the same files and --json objects
as the commands, silent, and a failed check that carries its reports and writes nothing."""

import json

import pytest
import torch
from helpers import randomize_batchnorm
from typer.testing import CliRunner

import expandctl
from expandctl import checkpoint as C
from expandctl.cli import app
from expandctl.errors import CheckFailed, NothingToExpandError
from expandctl.models import SmallNet
from expandctl.workflows import contract_checkpoint, expand_checkpoint

SMALL = {"kernel_size": 5, "image_size": 8}


def cli_json(*args):
    r = CliRunner().invoke(app, [str(a) for a in args] + ["--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture
def src(tmp_path):
    torch.manual_seed(0)
    return expandctl.save(
        randomize_batchnorm(SmallNet(**SMALL)),
        tmp_path / "sn.pt",
        arch="smallnet",
        arch_kwargs=SMALL,
        input_shape=(3, 8, 8),
    )


def test_expand_then_contract_from_python_matches_the_cli(src, tmp_path, capsys):
    r = expand_checkpoint(C.load_checkpoint(src), tmp_path / "api.pt", strategy="ck+fc", rate=2, seed=0)
    c = contract_checkpoint(C.load_checkpoint(r.output), tmp_path / "api.c.pt", fold_bn=True)
    assert capsys.readouterr() == ("", "")  # the library never prints
    e_cli = cli_json("expand", src, "--strategy", "ck+fc", "--rate", "2", "--seed", "0", "-o", tmp_path / "cli.pt")
    c_cli = cli_json("contract", tmp_path / "cli.pt", "-o", tmp_path / "cli.c.pt", "--fold-bn")
    same = lambda d: {k: v for k, v in d.items() if k not in ("ok", "command", "output", "source", "checks")}  # noqa: E731
    assert same(r.to_dict()) == same(e_cli) and r.params_after > r.params_before
    assert same(c.to_dict()) == same(c_cli) and c.params_after < r.params_before and c.folded_bn  # BN folded
    for a, b in ((r.output, tmp_path / "cli.pt"), (c.output, tmp_path / "cli.c.pt")):
        sa, sb = C.load_checkpoint(a).model.state_dict(), C.load_checkpoint(b).model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    big, small = r.model.double().eval(), c.model.double().eval()
    torch.testing.assert_close(small(x), big(x), rtol=1e-5, atol=1e-6)  # float32 weights, float64 run
    assert [rep.passed for rep in c.reports] == [True] * len(c.reports) and len(c.reports) == 4


def test_dry_run_plans_and_writes_nothing(src, tmp_path):
    r = expand_checkpoint(C.load_checkpoint(src), strategy="fc", include=["nothing*"], dry_run=True)
    assert r.dry_run and r.output is None and not r.plan.expanded and r.to_dict()["dry_run"] is True
    with pytest.raises(NothingToExpandError):
        expand_checkpoint(C.load_checkpoint(src), tmp_path / "e.pt", strategy="fc", include=["nothing*"])
    assert not (tmp_path / "e.pt").exists()


def test_a_failed_check_carries_its_reports_and_writes_nothing(src, tmp_path):
    r = expand_checkpoint(C.load_checkpoint(src), tmp_path / "e.pt", strategy="ck+fc", rate=2, seed=0)
    with pytest.raises(CheckFailed, match="does not match the expanded one") as e:
        contract_checkpoint(C.load_checkpoint(r.output), tmp_path / "c.pt", atol=0.0, rtol=0.0)
    assert e.value.reports and not all(rep.passed for rep in e.value.reports)
    assert e.value.details["passed"] is False and len(e.value.details["checks"]) == len(e.value.reports)
    assert not (tmp_path / "c.pt").exists()


def cli_run(*args):
    """exit code, the --json object and stderr of one CLI run."""
    r = CliRunner().invoke(app, [str(a) for a in args] + ["--json"])
    return r.exit_code, json.loads(r.stdout), r.stderr


def envelope_free(d: dict, *also: str) -> dict:
    return {k: v for k, v in d.items() if k not in ("ok", "command", *also)}


@pytest.fixture
def expanded(src, tmp_path):
    return expand_checkpoint(C.load_checkpoint(src), tmp_path / "e.pt", strategy="ck+fc", rate=2, seed=0).output


def test_verify_export_inspect_from_python_match_the_cli(expanded, tmp_path, capsys):
    from expandctl.workflows import ExportOptions, export_checkpoint, inspect_file, verify_files

    v = verify_files(expanded)
    x = export_checkpoint(expanded, tmp_path / "api.onnx", ExportOptions(opset=18))
    v2 = verify_files(expanded, x.output)
    i, i_onnx = inspect_file(expanded), inspect_file(x.output)
    assert capsys.readouterr() == ("", "")  # the library never prints
    assert v.passed and v.title.endswith("expanded (explicit) vs contracted") and len(v.reports) == 2
    assert envelope_free(cli_json("verify", expanded)) == v.to_dict()
    assert envelope_free(cli_json("verify", expanded, x.output)) == v2.to_dict()
    x_cli = cli_json("export", expanded, "-o", tmp_path / "cli.onnx", "--opset", "18")
    assert envelope_free(x_cli, "output") == envelope_free(x.to_dict(), "output")
    assert x.to_dict()["output"] == str(tmp_path / "api.onnx") and len(x.reports) == 3  # f64, f32, onnxruntime
    assert envelope_free(cli_json("inspect", expanded)) == i.to_dict() and i.kind == "checkpoint" and i.layers
    assert i.compact_params < i.params
    assert envelope_free(cli_json("inspect", x.output)) == i_onnx.to_dict() and i_onnx.kind == "onnx"


def test_evaluate_from_python_matches_the_cli(src, tmp_path, capsys):
    from expandctl.data import DataOptions
    from expandctl.workflows import EvaluateOptions, evaluate_file

    r = evaluate_file(src, "digits", EvaluateOptions(split="train", data_options=DataOptions(channels=3)))
    assert capsys.readouterr() == ("", "")
    cli = cli_json("evaluate", src, "--data", "digits", "--split", "train", "--channels", "3")
    assert envelope_free(cli) == r.to_dict() and r.metrics["samples"] > 1000 and 0 <= r.accuracy <= 1
    gate = EvaluateOptions(min_accuracy=100, data_options=DataOptions(channels=3))
    with pytest.raises(CheckFailed, match=r"is below min_accuracy 100 \(chance") as e:
        evaluate_file(src, "digits", gate)
    assert e.value.option == "min_accuracy" and e.value.result.accuracy < 1
    code, out, err = cli_run("evaluate", src, "--data", "digits", "--channels", "3", "--min-accuracy", "100")
    assert code == 1 and "is below --min-accuracy 100 (chance" in out["error"] and out["min_accuracy"] == 100


@pytest.mark.parametrize(
    "call, option, library, flag",
    [
        ("verify_dtype", "dtype", "dtype must be float32 or float64, got 'float16'", "--dtype must be float32"),
        ("evaluate_split", "split", "split must be val or train, not 'test'", "--split must be val or train"),
        ("evaluate_batch", "batch_size", "batch_size must be at least 1", "--batch-size must be at least 1"),
        ("graph_dynamic", ("dynamic_size", "graph"), "dynamic_size is not available with graph",
         "--dynamic-size is not available with --graph"),
    ],
)  # fmt: skip
def test_library_errors_name_the_parameter_and_the_cli_the_flag(src, tmp_path, call, option, library, flag):
    from expandctl.errors import UsageError
    from expandctl.workflows import (
        EvaluateOptions,
        VerifyOptions,
        contract_graph_checkpoint,
        evaluate_file,
        verify_files,
    )

    calls = {
        "verify_dtype": (lambda: verify_files(src, options=VerifyOptions(dtype="float16")),
                         ["verify", src, "--dtype", "float16"]),
        "evaluate_split": (lambda: evaluate_file(src, "digits", EvaluateOptions(split="test")),
                           ["evaluate", src, "--data", "digits", "--split", "test"]),
        "evaluate_batch": (lambda: evaluate_file(src, "digits", EvaluateOptions(batch_size=0)),
                           ["evaluate", src, "--data", "digits", "--batch-size", "0"]),
        "graph_dynamic": (lambda: contract_graph_checkpoint(C.load_checkpoint(src), None, dynamic_size=True),
                          ["contract", src, "--graph", "--dry-run", "--dynamic-size"]),
    }  # fmt: skip
    run, argv = calls[call]
    with pytest.raises(UsageError) as e:
        run()
    assert str(e.value).startswith(library) and e.value.option == option
    code, out, err = cli_run(*argv)
    assert code == 2 and out["error"].startswith(flag) and err.startswith(f"error: {flag}"), (out, err)
