"""What a new user hit, third round (issue 25): a rate the machine cannot hold, NaN weights given to
train, compare's rates, a silent change of input size, a gate that fails a model at chance, compare's
dry run, split and figure, the messages and the help. In-process through CliRunner, except where the
console entry point itself is under test (Click's usage errors)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from expandctl import workflows
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


def _digit_folder(root: Path, classes=3, per_class=10, size=8) -> Path:
    """Real digits (scikit-learn's 8x8 set) as ``size`` x ``size`` PNGs in ``root/CLASS/``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for j in np.nonzero(d.target == c)[0][:per_class]:
            img = Image.fromarray((d.images[j] * 255 / 16).astype(np.uint8)).resize((size, size))
            img.save(root / str(c) / f"{j}.png")
    return root


# --------------------------------------------------------------------------------------------------
# 1. A rate the machine cannot hold is a usage error (exit 2, both sizes), and a far-too-large plan warns
# --------------------------------------------------------------------------------------------------
def test_expand_refuses_a_model_larger_than_the_available_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(workflows, "available_memory", lambda: 2**20)  # 1 MiB free
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
    assert factor > workflows.FAR_BEYOND_COMPACT
    assert any(f"{factor:,.0f}x the compact model's" in w for w in data["warnings"]), data["warnings"]
    r = cli(*args, "--rate", "40", "--dry-run")
    assert r.exit_code == 0 and f"warning: the expanded model has {data['params_after']:,} parameters" in r.stderr
    monkeypatch.setattr(workflows, "available_memory", lambda: 2**20)
    r = cli(*args, "--rate", "40", "--dry-run")  # a dry run writes nothing: it says expand would refuse
    assert r.exit_code == 0 and "refused without --dry-run: the expanded model would need" in r.stderr


def test_compare_refuses_a_rate_the_machine_cannot_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(workflows, "available_memory", lambda: 2**20)
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
    root = _digit_folder(d / "pngs")
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
