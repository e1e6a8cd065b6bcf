"""examples/reproduce.py end to end on `digits` (tiny): run files, skipping on a second call, tables."""

import json
import re
import statistics
from pathlib import Path

import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    return load_script("reproduce")


def args(out, *extra):
    return ["--data", "digits", "--kernels", "5", "--variants", "compact,ck+fc", "--seeds", "0",
            "--epochs", "1", "--train-subset", "200", "--out", str(out), *extra]  # fmt: skip


def test_runs_then_skips_and_tables_match_run_files(reproduce, tmp_path, capsys):
    out = tmp_path / "out"
    first = reproduce.main(args(out))
    assert first["ran"] == ["compact-k5-s0", "ck+fc-k5-s0"] and first["skipped"] == []
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert set(runs) == {"compact-k5-s0", "ck+fc-k5-s0"}
    ck = runs["ck+fc-k5-s0"]
    assert ck["train_size"] == 200 and ck["val_size"] == 360 and len(ck["history"]) == 1
    assert ck["params_compact"] == runs["compact-k5-s0"]["params_compact"] < ck["params_trained"]
    assert ck["contraction_max_rel_float64"] < 1e-12
    # the contracted model was evaluated on its own; it computes what the trained (expanded) one did
    assert abs(ck["final_acc"] - ck["last_epoch_val_acc"]) <= 1 / 360
    for name in ("results.md", "results.json", "accuracy_vs_kernel.png", "curves.png"):
        assert (out / name).is_file()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}

    second = reproduce.main(args(out))
    assert second["ran"] == [] and sorted(second["skipped"]) == sorted(runs)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    assert "ran 0, skipped 2 finished" in capsys.readouterr().out

    table = (out / "results.md").read_text()
    summary = json.loads((out / "results.json").read_text())
    for run in runs.values():
        cell = summary["cells"][run["variant"]]["5"]
        assert cell["n"] == 1 and cell["mean"] == pytest.approx(statistics.fmean([run["final_acc"]]))
        row = re.search(rf"^\| {re.escape(run['variant'])} \| ([^|]+) \|", table, re.M).group(1)
        assert row.strip() == f"{100 * run['final_acc']:.2f} +- 0.00 (1)"


def test_other_settings_in_the_same_out_are_refused(reproduce, tmp_path):
    out = tmp_path / "out"
    reproduce.main(args(out, "--report-only"))  # an empty report is fine
    (out / "settings.json").write_text(json.dumps({"data": "digits", "epochs": 3}))
    with pytest.raises(SystemExit, match="other settings"):
        reproduce.main(args(out))


def test_mean_std_and_ck_needs_a_kernel_above_3(reproduce):
    assert reproduce.mean_std([0.5, 0.7]) == pytest.approx((0.6, statistics.stdev([0.5, 0.7])))
    assert reproduce.fmt([0.5, 0.7]) == "60.00 +- 14.14 (2)"
    assert not reproduce.applicable("ck+fc", 3) and reproduce.applicable("cl+fc", 3) and reproduce.applicable("ck", 5)


def test_stratified_subset_is_fixed_and_balanced(reproduce):
    import torch

    labels = torch.arange(1000) % 10
    a, b = reproduce.subset_indices(labels, 200, 0), reproduce.subset_indices(labels, 200, 0)
    assert torch.equal(a, b) and len(a.unique()) == 200
    assert torch.bincount(labels[a]).tolist() == [20] * 10
    assert not torch.equal(a, reproduce.subset_indices(labels, 200, 1))
