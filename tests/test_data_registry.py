"""The data registry: one module per source, every ``--data`` help and docs/train.md's table read it, and
reading it loads no torch (so that ``--help`` is instant)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expandctl.data import ArraySplits, DataOptions, DataSource, load_data, parse_spec, register, registry, spec_help
from expandctl.data.__main__ import main as data_main
from expandctl.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = ["digits", "mnist5k", "fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic"]


def _checkers(arg, options, shape) -> ArraySplits:
    """A 2-class set of 2x2 checkerboards, ``arg`` images per split."""
    n = int(arg or 4)
    y = np.arange(n) % 2
    x = np.stack([np.full((1, 2, 2), v, dtype=np.float32) for v in y])
    return ArraySplits(x, y, x.copy(), y.copy(), 2)


@pytest.fixture
def fake_source():
    src = register(DataSource("checkers", "checkers[:N]", "checkerboards, N per split (a test)", _checkers, order=999))
    yield src
    registry.SOURCES.pop("checkers")


def test_the_built_in_sources_are_registered_in_help_order():
    assert [s.name for s in registry.sources()] == BUILT_IN
    assert spec_help() == (
        "digits | mnist5k | fashion-mnist[:DIR] | mnist[:DIR] | cifar10[:DIR] | cifar100[:DIR] | imagefolder:DIR | "
        "synthetic[:CxHxW] (see docs/train.md)."
    )


def test_a_registered_source_is_in_the_help_the_docs_table_and_loadable(fake_source):
    assert "checkers" not in BUILT_IN
    assert spec_help().endswith("| synthetic[:CxHxW] | checkers[:N] (see docs/train.md).")
    assert "| `checkers[:N]` | checkerboards, N per split (a test) |" in registry.markdown_table()
    assert parse_spec("CHECKERS:6") == ("checkers", "6")
    s = load_data("checkers:6", options=DataOptions(channels=3))
    assert (len(s.train), len(s.val), s.num_classes, s.input_shape) == (6, 6, 2, (3, 2, 2))
    x, y = s.train[[0, 1]]
    assert x.shape == (2, 3, 2, 2) and y.tolist() == [0, 1] and float(x[1].min()) == 1.0


def test_unknown_spec_lists_the_registered_sources(fake_source):
    with pytest.raises(UsageError, match=r"unknown data spec 'nope'; use one of digits, mnist5k, .*checkers\[:ARG\]"):
        parse_spec("nope")


@pytest.mark.parametrize(
    "source, message",
    [
        (DataSource("Caps", "Caps", "", _checkers), "lower case"),
        (DataSource("tiles", "tiles:N", "", _checkers), None),  # NAME:ARG
        (DataSource("odd", "odd(DIR)", "", _checkers), "must be NAME, NAME:ARG or NAME"),
        (DataSource("digits", "digits", "", _checkers), "already registered"),
    ],
)
def test_register_checks_the_grammar_and_the_name(source, message):
    if message is None:
        register(source)
        registry.SOURCES.pop(source.name)
        return
    with pytest.raises(ValueError, match=message):
        register(source)


def test_registry_and_sources_load_no_torch():
    """What ``--data``'s help reads imports neither torch nor torchvision (torch alone costs seconds)."""
    code = (
        "import sys, expandctl.data.registry as r, expandctl.data.sources; "
        f"assert [s.name for s in r.sources()] == {BUILT_IN!r}; "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')); "
        "assert not loaded, (len(loaded), loaded[:3])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_docs_train_md_lists_the_registered_sources():
    """docs/train.md's table is the registry's; `python -m expandctl.data --write docs/train.md` rewrites it."""
    text = (ROOT / "docs" / "train.md").read_text()
    assert registry.DOCS_BEGIN in text and registry.DOCS_END in text
    fix = "python -m expandctl.data --write docs/train.md"
    assert registry.sync_docs(text) == text, f"docs/train.md is out of step with the registry: {fix}"


def test_the_docs_table_is_rewritten_from_the_registry(tmp_path, capsys, fake_source):
    doc = tmp_path / "train.md"
    doc.write_text(f"# Data\n\n{registry.DOCS_BEGIN}\n| old |\n{registry.DOCS_END}\n\nafter\n")
    assert data_main(["--check", str(doc)]) == 1
    assert data_main(["--write", str(doc)]) == 0
    assert data_main(["--check", str(doc)]) == 0
    text = doc.read_text()
    assert "| old |" not in text and "`checkers[:N]`" in text and text.endswith("-->\n\nafter\n")
    capsys.readouterr()
    data_main([])
    assert "checkers[:N]" in capsys.readouterr().out
    with pytest.raises(UsageError, match="no <!-- data-sources:begin"):
        registry.sync_docs("no markers")
