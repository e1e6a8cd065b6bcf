"""``expandctl train`` through Typer's CliRunner: output styles, errors and exit codes."""

import io
import json
import subprocess
import sys

import pytest
import typer
from rich.console import Console
from test_train import make_src
from typer.testing import CliRunner

from expandctl.commands.runtime import Command
from expandctl.commands.train import ConsoleReporter, epoch_line, train
from expandctl.console import UI

app = typer.Typer()
app.command("train", cls=Command)(train)  # as expandctl.cli registers it (flags in errors)


@app.callback()
def _root() -> None:
    """Keep ``train`` a subcommand, as in the main app."""


runner = CliRunner()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_src(tmp_path_factory.mktemp("cli"))


def invoke(src, out, *extra):
    args = ["train", str(src), "--data", "synthetic", "--epochs", "2", "--batch-size", "64", "--lr", "0.1"]
    return runner.invoke(app, [*args, "--out", str(out), *extra])


def test_plain_lines_and_summary_table(src, tmp_path):
    r = invoke(src, tmp_path / "run")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"train {src} (4 expanded layers,") and "on synthetic" in lines[0]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2 and epochs[0].startswith("epoch 1/2  lr 0.1  train loss ")
    assert "img/s" in epochs[0] and epochs[0].endswith("best")
    assert "best val acc" in r.stdout and "metrics.jsonl" in r.stdout
    assert "\x1b[" not in r.stdout and r.stderr == ""


def test_json_is_one_object(src, tmp_path):
    r = invoke(src, tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)  # exactly one object, nothing else
    assert payload["ok"] is True and payload["command"] == "train"
    assert [h["epoch"] for h in payload["history"]] == [1, 2]
    assert payload["best_epoch"] in (1, 2) and payload["files"]["last"].endswith("last.pt")


def test_quiet_prints_only_the_result_line(src, tmp_path):
    r = invoke(src, tmp_path / "run", "--quiet")
    assert r.exit_code == 0, r.output
    assert "epoch 1/2" not in r.stdout and len(r.stdout.strip().splitlines()) == 1
    assert r.stdout.startswith(f"wrote {tmp_path / 'run' / 'last.pt'} (final val acc ")


def test_resume_through_the_cli(src, tmp_path):
    assert invoke(src, tmp_path / "run").exit_code == 0
    again = invoke(src, tmp_path / "run")
    assert again.exit_code == 2 and "--resume" in again.stderr
    r = invoke(src, tmp_path / "run", "--resume", "--epochs", "3")
    assert r.exit_code == 2 and "--epochs 3 (the run has 2)" in r.stderr


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--data", "imagenet"], 2, "unknown data spec"),
        (["--data", "cifar10:/nonexistent"], 2, "--data cifar10:/nonexistent: no such folder"),
        (["--optimizer", "lion"], 2, "--optimizer must be one of sgd, adamw"),
        (["--arch-kwargs", "{bad"], 2, "--arch-kwargs is not valid JSON"),
        (["--lr", "1e6", "--schedule", "paper"], 1, "loss became"),
        (["--nonlinear-warmup", "2"], 2, "smaller than --epochs"),
    ],
)
def test_errors_are_one_line_with_exit_codes(src, tmp_path, extra, code, message):
    r = invoke(src, tmp_path / "run", *extra)
    assert r.exit_code == code, r.output
    assert r.stderr.startswith("error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_error_with_json_is_one_object(src, tmp_path):
    r = invoke(src, tmp_path / "run", "--json", "--data", "nope")
    assert r.exit_code == 2
    payload = json.loads(r.stdout)
    assert payload["ok"] is False and payload["exit_code"] == 2 and "unknown data spec" in payload["error"]


def test_missing_src(tmp_path):
    r = invoke(tmp_path / "nope.pt", tmp_path / "run")
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_progress_bars_at_a_terminal():
    ui = UI("train")
    buffer = io.StringIO()
    ui.err = Console(file=buffer, force_terminal=True, width=100)
    ui.out = Console(file=io.StringIO(), width=200)
    ui.progress = True
    rep = ConsoleReporter(ui)
    info = {
        "epochs": 2, "expanded_layers": 0, "world_size": 2, "src": "a.pt", "params": 10, "data": "digits",
        "train_size": 5, "val_size": 2, "input_shape": [1, 8, 8], "num_classes": 10, "device": "cpu",
        "resumed": True, "out": "run", "start_epoch": 1,
    }  # fmt: skip
    rep.on_start(info)
    rep.on_epoch_start(2, 2, 3)
    for step in (1, 2, 3):
        rep.on_step(step, 3, 0.5)
    assert rep.progress is not None
    row = {"epoch": 2, "lr": 0.01, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.2, "val_acc": 0.25,
           "seconds": 1.0, "images_per_s": 100.0, "nonlinear": True, "grad_confusion": -0.123456}  # fmt: skip
    rep.on_epoch_end(row, False)
    assert rep.progress is None and "epoch 2/2" in buffer.getvalue()
    printed = ui.out.file.getvalue()
    assert "x 2 processes" in printed and "resuming run/last.pt after epoch 1" in printed
    assert "nonlinear True  grad_confusion -0.1235" in printed


def test_epoch_line_format():
    row = {"epoch": 7, "lr": 0.001, "train_loss": 0.52104, "train_acc": 0.841, "val_loss": 0.4,
           "val_acc": 0.8725, "seconds": 4.12, "images_per_s": 5120.4}  # fmt: skip
    assert epoch_line(row, 150, True) == (
        "epoch   7/150  lr 0.001  train loss 0.5210 acc 84.10%  val loss 0.4000 acc 87.25%  4.1s  5120 img/s  best"
    )


def test_help_loads_no_torch():
    """``expandctl train --help`` answers without torch: the command imports the library only when it runs."""
    code = "import sys; from expandctl.commands import train; assert 'torch' not in sys.modules, 'torch loaded'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
