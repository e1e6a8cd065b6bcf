"""expandctl.kinds: the one home of the built-in expansion kinds' names, summaries and default rates,
read by ``expand --help`` without loading torch, and by the layer classes themselves."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch.nn as nn

from expandctl import kinds
from expandctl.layers import EXPANSIONS, ExpandedLinear, register_expansion
from expandctl.layers.base import _REGISTRY
from expandctl.rewrite import expand


def test_every_builtin_kind_is_registered_with_the_metadata_of_kinds():
    assert list(kinds.KINDS) == [k for k in EXPANSIONS if k in kinds.KINDS]
    for name, kind in kinds.KINDS.items():
        assert kind.name == name
        for cls in EXPANSIONS[name]:  # cl and ck: the conv and the transposed-conv class
            assert (cls.summary, cls.default_rate) == (kind.summary, kind.default_rate), cls


def test_the_help_texts_are_what_the_registry_says():
    listed = "; ".join(f"{k}: {EXPANSIONS[k][0].summary}" for k in EXPANSIONS)
    assert kinds.strategy_help() == f"'+'-joined expansion kinds ({listed})."
    assert kinds.rate_help() == (
        "Expansion rate r >= 1 (hidden widths r*m, r*n); default per kind: fc/cl/ck 4, acb/rep unused, dbb/orepa 1."
    )


def test_importing_kinds_loads_no_torch():
    code = "import sys, expandctl.kinds; assert 'torch' not in sys.modules, 'torch was imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


class _Doubled(ExpandedLinear):
    """A user's kind: registered under its own name, with its own summary and rate."""

    kind = "doubled"
    summary = "a user's kind"
    default_rate = 2.0


@pytest.fixture
def user_kind():
    register_expansion(_Doubled)
    yield _Doubled
    del _REGISTRY["doubled"]


def test_a_registered_kind_keeps_its_own_attributes(user_kind):
    assert EXPANSIONS["doubled"] == (user_kind,)
    assert EXPANSIONS["doubled"][0].summary == "a user's kind" and EXPANSIONS["doubled"][0].default_rate == 2.0
    assert "doubled" not in kinds.KINDS and "doubled" not in kinds.strategy_help()
    big = expand(nn.Sequential(nn.Linear(4, 3)), strategy="doubled")
    assert isinstance(big[0], user_kind) and big[0].config() == {"kind": "doubled", "hidden": [8, 6]}
