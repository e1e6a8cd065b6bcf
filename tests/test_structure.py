"""The layering issue 18 asked for, read from the source: datasets do not live under train/, nothing
imports the package root for ``__version__``, and train and analyze share one fit probe and one
``--device`` check."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import expandctl
from expandctl.cli import app
from expandctl.errors import UsageError
from expandctl.models import SmallNet
from expandctl.probe import check_fits, device_kind
from expandctl.train import TrainConfig, train

PACKAGE = Path(expandctl.__file__).parent
TINY = {"in_channels": 1, "image_size": 8, "kernel_size": 3, "channels": [4, 8], "hidden": 16, "num_classes": 4}


def imports(path: Path) -> set[str]:
    """The absolute names of the expandctl modules that ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.split(".")[:-1]  # a module's package; for __init__.py (module "pkg.__init__") the package itself
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_analysis_and_the_cli_runtime_do_not_import_train():
    files = [*(PACKAGE / "analysis").glob("*.py"), PACKAGE / "commands" / "runtime.py", PACKAGE / "evaluate.py"]
    for f in files:
        bad = sorted(n for n in imports(f) if n == "expandctl.train" or n.startswith("expandctl.train."))
        assert not bad, f"{f.relative_to(PACKAGE)} imports {bad}"


def test_nothing_imports_the_package_root_for_its_version():
    for f in PACKAGE.rglob("*.py"):
        assert "expandctl.__version__" not in imports(f), f"{f.relative_to(PACKAGE)} imports the package root"
    from expandctl._version import __version__

    assert expandctl.__version__ == __version__


def test_device_check():
    assert device_kind("CPU") == "cpu"
    assert device_kind("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match=r"--device must be auto, cpu or cuda \(got 'tpu'\)"):
        device_kind("tpu")


def test_train_and_analyze_share_the_fit_probe(tmp_path):
    """A 4-class model on the 10-class synthetic set: the same sentence from the library probe, from
    train and from analyze (each naming the model its own way)."""
    from expandctl.data import load_data

    torch.manual_seed(0)
    model = SmallNet(**TINY)
    src = expandctl.save(model, tmp_path / "m.pt", arch="smallnet", arch_kwargs=TINY, input_shape=(1, 8, 8))
    sets = load_data("synthetic:1x8x8")
    model.train()
    with pytest.raises(UsageError, match="the model has 4 outputs but synthetic:1x8x8 has 10 classes"):
        check_fits(model, sets.val, "synthetic:1x8x8", sets.num_classes, sets.input_shape, torch.device("cpu"))
    assert model.training  # the probe puts the mode back
    with pytest.raises(UsageError, match="the model has 4 outputs but synthetic has 10 classes"):
        train(TrainConfig(src=str(src), data="synthetic", epochs=1, out=str(tmp_path / "run"), device="cpu"))
    args = ["analyze", "grad-confusion", str(src), "--data", "synthetic", "--pairs", "2", "--device", "cpu"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and f"the model in {src} has 4 outputs but synthetic has 10 classes" in r.output


def test_every_command_lives_in_its_own_module():
    """One convention: cli.py holds the app and the registration list, no command of its own."""
    import typer.main

    group = typer.main.get_command(app)
    names = list(group.commands)
    assert names[:7] == ["expand", "contract", "verify", "export", "inspect", "evaluate", "train"]
    for name, command in group.commands.items():
        subcommands = getattr(command, "commands", None) or {name: command}
        for sub in subcommands.values():
            assert sub.callback.__module__ != "expandctl.cli", f"{name} is defined inline in cli.py"
    assert len((PACKAGE / "cli.py").read_text().splitlines()) < 150


def test_each_command_is_defined_in_the_module_named_after_it():
    """``expandctl plot`` in commands/plot.py, ``analyze grad-confusion`` in commands/analyze.py: one module
    per command, found by its name."""
    import typer.main

    for name, command in typer.main.get_command(app).commands.items():
        for sub in (getattr(command, "commands", None) or {name: command}).values():
            assert sub.callback.__module__ == f"expandctl.commands.{name}", (name, sub.callback.__module__)
