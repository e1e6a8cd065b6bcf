"""What a new user hit (issue 11): shape mismatches, verify's input shape, user modules, CI strictness,
small CLI points. In-process through CliRunner, on SmallNets and a user's module written to tmp_path."""

import json
import sys

import pytest
import torch.nn as nn
from typer.testing import CliRunner

from expandctl.cli import app
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


def test_plan_shows_groups_of_depthwise_factors():
    from expandctl.rewrite import plan

    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16))
    entry = plan(model, "cl", 4).expanded[0]
    assert entry.factors == ["16->64 1x1 g16", "64->64 3x3 g16", "64->16 1x1 g16"]


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
