"""What a new user hit, third round (issue 25): a rate the machine cannot hold, NaN weights given to
train, compare's rates, a silent change of input size, a gate that fails a model at chance, compare's
dry run, split and figure, the messages and the help. In-process through CliRunner, except where the
console entry point itself is under test (Click's usage errors)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import digit_folder
from typer.testing import CliRunner

from expandctl import sizes
from expandctl.cli import app

runner = CliRunner()
GRAY = {"kernel_size": 5, "in_channels": 1, "image_size": 8}  # 1x8x8, the digits shape
TINY = {"in_channels": 1, "image_size": 8, "kernel_size": 5, "channels": [4, 8, 8], "hidden": 16}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def cli_json(*args, code=0):
    result = cli(*args, "--json")
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    data = json.loads(lines[0])
    assert data["ok"] is (code == 0)
    return data


# --------------------------------------------------------------------------------------------------
# 1. A rate the machine cannot hold is a usage error (exit 2, both sizes), and a far-too-large plan warns
# --------------------------------------------------------------------------------------------------
def test_expand_refuses_a_model_larger_than_the_available_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(sizes, "available_memory", lambda: 2**20)  # 1 MiB free
    out = tmp_path / "r.pt"
    data = cli_json("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(GRAY), "--strategy", "cl",
                    "--rate", "64", "-o", out, code=2)  # fmt: skip
    assert data["error_type"] == "UsageError" and "internal error" not in data["error"]
    assert "would need" in data["error"] and "1.0 MiB of memory available" in data["error"]
    assert "--rate" in data["error"]
    assert not out.exists()


def test_a_huge_rate_fails_before_allocating_with_the_real_memory(tmp_path):
    """Rate 10,000: terabytes of parameters, more than any machine this runs on; refused from the plan."""
    r = cli("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(GRAY), "--strategy", "cl",
            "--rate", "10000", "-o", tmp_path / "r.pt")  # fmt: skip
    assert r.exit_code == 2 and r.stderr.startswith("error: the expanded model would need")
    assert "TiB" in r.stderr and "available" in r.stderr


def test_the_plan_warns_when_the_expanded_model_is_far_beyond_compact(tmp_path, monkeypatch):
    args = ["expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(GRAY), "--strategy", "cl"]
    quiet = cli_json(*args, "--rate", "2", "--dry-run")
    assert quiet["warnings"] == []
    data = cli_json(*args, "--rate", "40", "--dry-run")
    factor = data["params_after"] / data["params_before"]
    assert factor > sizes.FAR_BEYOND_COMPACT
    assert any(f"{factor:,.0f}x the compact model's" in w for w in data["warnings"]), data["warnings"]
    r = cli(*args, "--rate", "40", "--dry-run")
    assert r.exit_code == 0 and f"warning: the expanded model has {data['params_after']:,} parameters" in r.stderr
    monkeypatch.setattr(sizes, "available_memory", lambda: 2**20)
    r = cli(*args, "--rate", "40", "--dry-run")  # a dry run writes nothing: it says expand would refuse
    assert r.exit_code == 0 and "refused without --dry-run: the expanded model would need" in r.stderr


def test_compare_refuses_a_rate_the_machine_cannot_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(sizes, "available_memory", lambda: 2**20)
    out = tmp_path / "study"
    data = cli_json("compare", "--arch", "smallnet", "--arch-kwargs", json.dumps(GRAY), "--data", "digits",
                    "--strategies", "compact,cl", "--rate", "64", "--out", out, code=2)  # fmt: skip
    assert "the cl model would need" in data["error"] and "available" in data["error"]
    assert not out.exists()  # refused before the folder or any run


# --------------------------------------------------------------------------------------------------
# 3. One default rate per kind: compare's dbb/orepa get expand's rate (1), and the report records it
# 6. compare --dry-run
# --------------------------------------------------------------------------------------------------
def test_compare_dry_run_lists_runs_rates_params_and_skips(tmp_path):
    out = tmp_path / "study"
    data = cli_json("compare", "--arch", "smallnet", "--arch-kwargs", json.dumps(TINY), "--data", "digits",
                    "--strategies", "compact,orepa,dbb,ck,fc", "--seeds", "2", "--include", "features.*",
                    "--dry-run", "--out", out)  # fmt: skip
    assert not out.exists()
    assert data["dry_run"] is True and data["runs"][:4] == ["compact-s0", "orepa-s0", "dbb-s0", "ck-s0"]
    assert len(data["runs"]) == 8 and set(data["skipped"]) == {"fc"} and "selects no layer" in data["skipped"]["fc"]
    by = {s["strategy"]: s for s in data["strategies"]}
    assert (by["compact"]["rate"], by["orepa"]["rate"], by["dbb"]["rate"], by["ck"]["rate"]) == (None, 1.0, 1.0, 4.0)
    for kind in ("orepa", "dbb", "ck"):  # the parameter count expand's own plan gives at its default rate
        e = cli_json("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(TINY), "--strategy", kind,
                     "--include", "features.*", "--dry-run")  # fmt: skip
        assert by[kind]["params"] == e["params_after"], kind
    r = cli("compare", "--arch", "smallnet", "--arch-kwargs", json.dumps(TINY), "--data", "digits",
            "--strategies", "compact,orepa,fc", "--include", "features.*", "--dry-run", "--out", out)  # fmt: skip
    assert r.exit_code == 0 and "fc: skipped" in r.stdout and "would run 6 runs" in r.stdout and not out.exists()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A real two-seed study of compact and orepa at the default rates on a folder of PNGs, half held out."""
    d = tmp_path_factory.mktemp("third")
    root = digit_folder(d / "pngs", size=8)
    out = d / "study"
    kw = json.dumps({**TINY, "num_classes": 3})
    result = runner.invoke(app, ["compare", "--arch", "smallnet", "--arch-kwargs", kw,
                                 "--data", f"imagefolder:{root}", "--channels", "1", "--strategies", "compact,orepa",
                                 "--seeds", "2", "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.5",
                                 "--out", str(out), "--json"])  # fmt: skip
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return out, json.loads(result.stdout), root


def test_compare_trains_orepa_at_its_own_default_rate_and_records_it(study):
    out, data, _ = study
    rows = {r["strategy"]: r for r in data["report"]["strategies"]}
    assert rows["orepa"]["rate"] == 1.0 and rows["compact"]["rate"] is None
    e = cli_json("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps({**TINY, "num_classes": 3}),
                 "--strategy", "orepa", "--dry-run")  # fmt: skip
    assert rows["orepa"]["params_trained"] == e["params_after"]
    assert "orepa 1" in (out / "report.md").read_text()


def test_compare_val_fraction_holds_out_that_share(study):
    out, _, _ = study
    run = json.loads((out / "runs" / "compact-s0.json").read_text())
    assert (run["val_size"], run["train_size"]) == (15, 15)  # half of 3 x 10 images


def _gain_summary(spread=(0.9, 1.6)):
    """A report's summary: compact and three strategies, three seeds each, one with a wide cost spread."""

    def row(s, d, accs, sec, sec_range):
        return {"strategy": s, "status": "ok", "n": len(accs), "accuracy": {"mean": sum(accs) / 3, "values": accs},
                "vs_compact": None if s == "compact" else {"difference": d, "std_error": 0.3, "p": 0.03,
                                                            "p_paired": 0.02, "p_adjusted": 0.06, "detectable": 1.5,
                                                            "paired_seeds": 3, "paired_std": 0.4},
                "seconds_ratio": sec, "seconds_ratio_range": list(sec_range), "memory_ratio": 1.01,
                "memory_ratio_range": [1.0, 1.02], "seconds_per_epoch": 1.0, "peak_memory_mib": 300,
                "memory_kind": "rss"}  # fmt: skip

    return {"strategies": [row("compact", 0, [97.0, 97.5, 98.0], 1.0, (0.95, 1.05)),
                           row("ck", 1.2, [98.0, 98.5, 99.2], 1.3, spread),
                           row("cl", 1.4, [98.0, 98.9, 99.5], 1.2, (1.15, 1.25)),
                           row("orepa", -0.4, [97.0, 96.9, 97.5], 1.1, (1.05, 1.12))],
            "runs": {"finished": 12}, "alpha": 0.05}  # fmt: skip


def test_gain_legends_cover_no_bar_or_seed_dot_and_cost_shows_its_spread():
    from matplotlib.collections import PathCollection
    from matplotlib.patches import Rectangle

    from expandctl.experiments.plots import gain_figure

    fig = gain_figure(_gain_summary(), "smallnet on digits")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        marks = [p.get_window_extent(renderer) for p in ax.patches if isinstance(p, Rectangle)]
        for coll in ax.collections:
            if isinstance(coll, PathCollection):  # the seed dots, in display coordinates
                marks += [type(legend).from_bounds(x - 1, y - 1, 2, 2) for x, y in coll.get_offset_transform()
                          .transform(coll.get_offsets())]  # fmt: skip
        assert marks and not any(legend.overlaps(m) for m in marks), ax.get_title()
    cost = fig.axes[1]
    bars = [c for c in cost.containers if getattr(c, "errorbar", None) is not None]
    assert len(bars) == 2  # seconds and memory, each with its min..max over the runs
    assert any("0.90-1.60" in t.get_text() for t in cost.texts)
    assert "(0.95-1.05x over its runs)" in cost.get_title()  # compact's own spread


def test_a_wide_cost_spread_gets_a_note_in_the_report():
    from expandctl.experiments import report as compare

    wide = compare._cost_notes(_gain_summary()["strategies"])
    assert len(wide) == 1 and wide[0].startswith("ck: seconds per epoch ranges 0.90-1.60x compact's mean")
    assert compare._cost_notes(_gain_summary(spread=(1.25, 1.35))["strategies"]) == []
    summary = {"strategies": [], "study": None, "verdict": "x.", "seeds": [0, 1, 2], "cost_notes": wide, "alpha": 0.05}
    assert f"Cost: {wide[0]}." in compare.render_markdown(summary)


# --------------------------------------------------------------------------------------------------
# 2. train checks its input as contract does: NaN weights are exit 2 naming the parameter
# --------------------------------------------------------------------------------------------------
def test_train_refuses_nan_weights_up_front(tmp_path):
    from expandctl import checkpoint as C

    src = tmp_path / "m.pt"
    assert cli("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(GRAY), "-o", src, "-q").exit_code == 0
    ckpt = C.load_checkpoint(src)
    name, weight = next(iter(ckpt.model.named_parameters()))
    with torch.no_grad():
        weight.view(-1)[3] = float("nan")
    C.save(ckpt.model, tmp_path / "nan.pt", arch=ckpt.arch, arch_kwargs=ckpt.arch_kwargs,
           input_shape=ckpt.input_shape, plan=ckpt.plan)  # fmt: skip
    data = cli_json("train", tmp_path / "nan.pt", "--data", "digits", "--epochs", "1", "--out", tmp_path / "run",
                    code=2)  # fmt: skip
    assert data["error"].startswith(f"{tmp_path / 'nan.pt'}: parameter {name!r} has 1 non-finite values (1 NaN)")
    assert "--lr" not in data["error"] and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# 4. The input size never changes silently: the hint names --image-size, a new size is a warning
# --------------------------------------------------------------------------------------------------
MYNET = """
import torch.nn as nn


class MyNet(nn.Module):  # any input size: global pooling before the classifier
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, padding=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))
"""


@pytest.fixture
def any_size_model(tmp_path, monkeypatch):
    """``m.pt``: a 3x32x32 model of the user's own class that also runs on 8x8 images."""
    name = f"mynet_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(MYNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = cli("expand", "--arch", f"{name}:MyNet", "--input-shape", "3,32,32", "--strategy", "ck", "-o",
            tmp_path / "m.pt", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    yield tmp_path / "m.pt"
    sys.modules.pop(name, None)


def test_the_channels_hint_names_image_size_too(any_size_model, tmp_path):
    data = cli_json("train", any_size_model, "--data", "digits", "--epochs", "1", "--out", tmp_path / "r", code=2)
    assert "takes 3x32x32 inputs" in data["error"] and data["error"].endswith("--channels 3 --image-size 32")


def test_training_at_another_size_than_recorded_warns_with_both(any_size_model, tmp_path):
    args = ["train", any_size_model, "--data", "digits", "--channels", "3", "--epochs", "1", "--train-subset", "50"]
    r = cli(*args, "--out", tmp_path / "r1", "-q")
    assert r.exit_code == 0, r.output
    assert "records input shape 3x32x32 but --data digits gives 3x8x8 images" in r.stderr
    assert "--image-size 32" in r.stderr
    data = cli_json(*args, "--out", tmp_path / "r2")
    assert any("3x32x32" in w and "3x8x8" in w for w in data["warnings"])
    quiet = cli(*args, "--image-size", "32", "--out", tmp_path / "r3", "-q")
    assert quiet.exit_code == 0 and "records input shape" not in quiet.stderr


# --------------------------------------------------------------------------------------------------
# 5. A gate that fails a model at chance: --min-accuracy on quantize and evaluate
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chance_onnx(tmp_path_factory):
    """An untrained 1x8x8 model as ONNX: about 10% on digits, float and INT8 alike."""
    d = tmp_path_factory.mktemp("chance")
    assert cli("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(GRAY), "--strategy", "rep",
               "-o", d / "rv.pt", "-q").exit_code == 0  # fmt: skip
    assert cli("contract", d / "rv.pt", "-o", d / "rv.onnx", "-q").exit_code == 0
    return d / "rv.onnx"


def test_quantize_min_accuracy_refuses_a_model_at_chance(chance_onnx, tmp_path):
    out = tmp_path / "q.onnx"
    base = ["quantize", chance_onnx, "--data", "digits", "-o", out, "--max-drop", "1.0", "--calib-size", "64",
            "--latency-rounds", "2"]  # fmt: skip
    data = cli_json(*base, "--min-accuracy", "50", code=1)
    assert data["error"].startswith("INT8 accuracy") and "below --min-accuracy 50" in data["error"]
    assert data["min_accuracy"] == 50 and data["passed"] is False and not out.exists()
    ok = cli_json(*base, "--min-accuracy", "5")
    assert ok["passed"] is True and out.exists()
    assert "between 0 and 100" in cli_json(*base, "--min-accuracy", "150", code=2)["error"]


def test_evaluate_min_accuracy_is_a_check(chance_onnx):
    data = cli_json("evaluate", chance_onnx, "--data", "digits", "--min-accuracy", "50", code=1)
    assert "below --min-accuracy 50" in data["error"] and data["error_type"] == "CheckFailed"
    assert data["accuracy"] < 0.5 and data["samples"] == 360
    assert cli_json("evaluate", chance_onnx, "--data", "digits", "--min-accuracy", "5")["min_accuracy"] == 5


def test_quantize_val_fraction_scores_that_share(tmp_path):
    root = digit_folder(tmp_path / "pngs", size=8)
    src = tmp_path / "m.pt"
    kw = {**GRAY, "num_classes": 3}
    assert cli("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(kw), "-o", src, "-q").exit_code == 0
    data = cli_json("quantize", src, "--data", f"imagefolder:{root}", "--channels", "1", "--val-fraction", "0.5",
                    "--calib-size", "8", "--latency-rounds", "2", "-o", tmp_path / "q.onnx")  # fmt: skip
    assert data["float_eval"]["samples"] == 15


# --------------------------------------------------------------------------------------------------
# 7. Messages: the class folder's name, an output folder that is a file, the output (not its temporary
#    file) in I/O errors, Click's usage errors as one line, --json errors that say where the reasons are
# --------------------------------------------------------------------------------------------------
def test_a_class_folder_with_one_image_is_named(tmp_path):
    from expandctl.data import load_data
    from expandctl.errors import UsageError

    root = digit_folder(tmp_path / "ci", classes=2, per_class=3, size=8)
    (root / "1").rename(root / "run")
    for extra in sorted((root / "run").iterdir())[1:]:
        extra.unlink()
    with pytest.raises(UsageError, match="imagefolder: folder 'run' has 1 image"):
        load_data(f"imagefolder:{root}")


def test_an_output_folder_that_is_a_file_is_called_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    data = cli_json("expand", "--arch", "smallnet", "-o", tmp_path / "afile" / "out.pt", code=2)
    assert f"'{tmp_path / 'afile'}' is a file, not a directory" in data["error"]
    assert "does not exist" not in data["error"]


def test_io_errors_name_the_output_not_its_temporary_file(tmp_path, monkeypatch):
    from expandctl.checkpoint import files

    out = tmp_path / "out.pt"

    def refused(prefix, suffix, dir):
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}etk5kmql{suffix}")

    monkeypatch.setattr(files.tempfile, "mkstemp", refused)
    data = cli_json("expand", "--arch", "smallnet", "-o", out, code=5)
    assert repr(str(out)) in data["error"] and ".out.pt." not in data["error"] and "Permission denied" in data["error"]
    monkeypatch.undo()
    with pytest.raises(OSError) as info, files.atomic_write(out) as tmp:
        raise OSError(28, "No space left on device", str(tmp))
    assert info.value.filename == str(out) and info.value.errno == 28 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("json_mode", [False, True])
def test_click_usage_errors_are_one_error_line_on_stderr(json_mode, monkeypatch, capsys):
    from expandctl.cli import main

    argv = ["expandctl", "train", "m.pt", "--epochs", "x", *(["--json"] if json_mode else [])]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Invalid value for '--epochs'"), captured.err
    assert lines[0].endswith("see 'expandctl train --help'") and "Usage:" not in captured.err
    if json_mode:
        data = json.loads(captured.out)
        assert data["ok"] is False and data["command"] == "train" and data["error"].startswith("Invalid value")
    else:
        assert captured.out == ""


def test_json_errors_say_where_the_reasons_are():
    args = ["expand", "--arch", "smallnet", "--strategy", "fc", "--include", "features*", "--dry-run"]
    data = cli_json(*args, code=4)
    assert "above" not in data["error"] and '"plan"."layers"[].reason' in data["error"]
    assert {e["reason"] for e in data["plan"]["layers"]} >= {"not matched by --include"}
    assert "in the table above" in cli(*args).stderr
    assert "without --quiet" in cli(*args, "-q").stderr


# --------------------------------------------------------------------------------------------------
# 8. Help: train --threads, evaluate without --augment, one placeholder style, train -q, the timm spec
# --------------------------------------------------------------------------------------------------
def test_train_takes_threads_as_compare_does(tmp_path):
    src = tmp_path / "m.pt"
    assert cli("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(GRAY), "-o", src, "-q").exit_code == 0
    before = torch.get_num_threads()
    try:
        data = cli_json("train", src, "--data", "digits", "--epochs", "1", "--train-subset", "40", "--threads", "2",
                        "--out", tmp_path / "run")  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert data["threads"] == 2
    assert "--threads N" in cli("train", "--help").stdout
    assert "train's --threads" in " ".join(cli("compare", "--help").stdout.split())
    refused = cli_json("train", src, "--data", "digits", "--threads", "0", code=2)
    assert "--threads must be at least 1" in refused["error"]


def test_evaluate_does_not_offer_augment():
    assert "--augment" not in cli("evaluate", "--help").stdout
    assert cli("evaluate", "x.pt", "--data", "digits", "--augment", "crop-flip").exit_code == 2


@pytest.mark.parametrize("command", [["expand"], ["contract"], ["verify"], ["export"], ["inspect"], ["evaluate"],
                                     ["train"], ["compare"], ["quantize"], ["plot"], ["analyze", "grad-confusion"],
                                     ["analyze", "landscape"]])  # fmt: skip
def test_help_uses_one_placeholder_style(command):
    import re

    text = cli(*command, "--help").stdout
    assert not re.findall(r"<(?:str|int|float|path|Path|bool)>", text), text
    assert not re.search(r"--\w[\w-]* TEXT\b", text) or command == ["plot"]  # plot --title TEXT: free text


def test_train_quiet_prints_one_line(tmp_path):
    src = tmp_path / "m.pt"
    assert cli("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(GRAY), "-o", src, "-q").exit_code == 0
    r = cli("train", src, "--data", "digits", "--epochs", "1", "--train-subset", "40", "--batch-size", "8",
            "--out", tmp_path / "run", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {tmp_path / 'run' / 'last.pt'} (final val acc "), r.stdout


def test_the_timm_arch_spec_in_the_docs_works():
    import re
    import shlex

    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    snippet = re.search(r"`(--arch timm:create_model --arch-kwargs '[^']+')`", text)
    assert snippet, "docs/cli.md shows the timm --arch spec"
    data = cli_json("expand", *shlex.split(snippet.group(1)), "--input-shape", "3,32,32", "--strategy", "cl",
                    "--dry-run")  # fmt: skip
    assert data["arch"]["spec"] == "timm:create_model" and data["expanded_layers"]
