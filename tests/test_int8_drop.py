"""benchmarks/int8_drop.py end to end on `digits` (tiny): trains, quantizes, tabulates; a second call reuses."""

import json
import re

import pytest
from helpers import load_script


def args(tmp_path, *extra):
    return ["--data", "digits", "--variants", "compact,ck", "--kernels", "5", "--seeds", "0", "--epochs", "1",
            "--train-subset", "200", "--val-subset", "100", "--calib-size", "64", "--latency-rounds", "3",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *extra]  # fmt: skip


def test_trains_quantizes_tabulates_and_resumes(tmp_path, capsys):
    bench = load_script("int8_drop", "benchmarks")
    summary = bench.main(args(tmp_path))
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "work" / "int8-minmax").glob("*.json")}
    assert set(records) == {"compact-k5-s0", "ck-k5-s0"} and set(summary) == {"compact-k5", "ck-k5"}
    for name, r in records.items():
        f, q = r["float_eval"], r["int8_eval"]
        assert f["samples"] == q["samples"] == 360  # the whole validation split, not the per-epoch subset
        assert r["drop_points"] == pytest.approx(100 * (f["accuracy"] - q["accuracy"]))
        assert abs(f["accuracy"] - r["torch_final_acc"]) <= 1 / 360  # the float ONNX is the trained model
        assert r["calibration"]["size"] == 64 and r["latency"]["rounds"] == 3 and r["latency"]["ratio"] > 0
        assert summary[name.rsplit("-", 1)[0]]["drop_points"] == [r["drop_points"]]
    table = (tmp_path / "out" / "int8_drop.md").read_text()
    row = re.search(r"^\| ck \| 5 \| 1 \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", table, re.M)
    ck = records["ck-k5-s0"]
    assert [float(c) for c in row.groups()] == pytest.approx(
        [100 * ck["float_eval"]["accuracy"], 100 * ck["int8_eval"]["accuracy"], ck["drop_points"]], abs=0.006
    )
    assert "digits, 1 epochs" in table and "64 training images" in table
    saved = json.loads((tmp_path / "out" / "int8_drop.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(summary))
    readme = bench.readme_table(tmp_path / "out")  # the README's rows, from the committed summary
    float_acc, drop = 100 * ck["float_eval"]["accuracy"], ck["drop_points"]
    assert f"| SmallNet 5x5 | ck | 1 | {float_acc:.2f} |" in readme and f"| {drop:.2f} |" in readme

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "int8-minmax").glob("*.json")}
    capsys.readouterr()
    bench.main(args(tmp_path))
    assert "ran 0, skipped 2 finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "int8-minmax").glob("*.json")} == mtimes
    with pytest.raises(SystemExit, match="quantized with other settings"):
        bench.main(args(tmp_path, "--calib-size", "32"))
    entropy = bench.main(args(tmp_path, "--calibration", "entropy"))  # same trained models, its own records
    assert (tmp_path / "out" / "int8_drop_entropy.md").is_file() and set(entropy) == set(summary)
    assert (tmp_path / "out" / "int8_drop.md").read_text() == table
