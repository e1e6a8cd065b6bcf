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
