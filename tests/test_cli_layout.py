"""The command layer's layout: one registration list naming every command module, shared trailing options
added in one place, and --help that loads no torch (the library is imported when a command runs)."""

import importlib
import pkgutil
import subprocess
import sys

import pytest
import typer

import expandctl.commands
from expandctl.cli import COMMANDS, app

NOT_COMMANDS = {"options", "runtime"}
#: The commands that runtime.command builds (their modules are checked one by one below; every command's
#: --help through the whole CLI is checked in test_expandctl_help_loads_no_torch).
TORCH_FREE = ["contract", "verify", "export", "inspect", "evaluate"]


def test_every_command_module_is_registered_once():
    modules = {m.name for m in pkgutil.iter_modules(expandctl.commands.__path__)} - NOT_COMMANDS
    registered = {}
    for name, command in COMMANDS:
        homes = [m for m in modules if command in vars(importlib.import_module(f"expandctl.commands.{m}")).values()]
        assert len(homes) == 1, (name, homes)
        registered[name] = homes[0]
    assert set(registered.values()) == modules, modules - set(registered.values())
    assert len({n for n, _ in COMMANDS}) == len(COMMANDS)
    on_app = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert on_app == {n for n, _ in COMMANDS}


def test_shared_options_trail_each_command_in_one_order():
    """runtime.command adds --arch/--arch-kwargs/--trust-pickle (load=True) and --json/--quiet/--debug last,
    where each command declared them before; the data adapters of evaluate sit before them."""
    group = typer.main.get_command(app)
    names = lambda cmd: [p.name for p in group.commands[cmd].params]  # noqa: E731
    tail = ["arch", "arch_kwargs", "trust_pickle", "as_json", "quiet", "debug"]
    for cmd in TORCH_FREE:
        assert names(cmd)[-6:] == tail, cmd
    assert names("verify") == ["a", "b", "atol", "rtol", "samples", "batch", "dtype", "seed", "input_shape", *tail]
    assert names("evaluate")[:10] == ["src", "data", "split", "batch_size", "min_accuracy", "channels", "image_size",
                                      "train_subset", "download", "val_fraction"]  # fmt: skip
    assert names("expand")[-4:] == ["trust_pickle", "as_json", "quiet", "debug"] and names("expand")[1:3] == tail[:2]


def _loads_torch(code: str) -> tuple[bool, str]:
    run = subprocess.run([sys.executable, "-c", code + "\nprint('torch' in sys.modules)"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    return lines[-1] == "True", "\n".join(lines[:-1])


@pytest.mark.parametrize("name", TORCH_FREE)
def test_a_command_module_and_its_help_load_no_torch(name):
    loads, shown = _loads_torch(
        "import sys, typer\n"
        "from expandctl.commands.runtime import Command\n"
        f"from expandctl.commands import {name} as m\n"
        "app = typer.Typer()\n"
        f"app.command('{name}', cls=Command)(m.{name})\n"
        "app.command('other')(lambda: None)\n"
        f"try:\n    app(['{name}', '--help'], prog_name='expandctl')\nexcept SystemExit:\n    pass"
    )
    assert f"Usage: expandctl {name}" in shown and "--json" in shown
    assert not loads, f"importing expandctl.commands.{name} or its --help loads torch"


@pytest.mark.parametrize("argv", [[], *[[name] for name, _ in COMMANDS]])
def test_expandctl_help_loads_no_torch(argv):
    loads, shown = _loads_torch(
        "import sys\nfrom expandctl.cli import main\n"
        f"sys.argv = ['expandctl', *{argv!r}, '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass"
    )
    assert "Usage: expandctl" in shown
    assert not loads


def test_the_download_help_names_the_downloadable_sources_of_the_registry(monkeypatch):
    """--download's help is read from the registry: a downloadable source registered there shows up."""
    from expandctl.commands import options
    from expandctl.data import registry

    group = typer.main.get_command(app)
    download = next(p for p in group.commands["train"].params if p.name == "download")
    assert f"Fetch a missing {options._downloadable()} into the cache" in download.help
    assert options._downloadable() == "fashion-mnist, mnist, cifar10 or cifar100"
    fake = registry.DataSource("svhn", "svhn[:DIR]", "street numbers (a test)", lambda *a: None, downloadable=True)
    monkeypatch.setitem(registry.SOURCES, "svhn", fake)
    assert options._downloadable() == "fashion-mnist, mnist, cifar10, cifar100 or svhn"
