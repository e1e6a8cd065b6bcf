"""What a new user hit (issue 11): shape mismatches, verify's input shape, user modules, CI strictness,
small CLI points. In-process through CliRunner, on SmallNets and a user's module written to tmp_path."""

import json

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
