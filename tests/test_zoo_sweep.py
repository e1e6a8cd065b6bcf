"""The zoo sweep's harness (benchmarks/zoo_sweep.py) on two small torchvision models: a run in a
worker process, the parameter bound, resuming, the record's fields and the summary. The sweep
itself is a benchmark; this keeps its machinery from rotting."""

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "zoo_sweep.py"


def _sweep(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--workers", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_sweep_runs_skips_resumes_and_summarises(tmp_path):
    out = tmp_path / "zoo.jsonl"
    models = "tv:squeezenet1_1,tv:mobilenet_v3_small"
    r = _sweep(out, "--models", models, "--max-params", "1e6", "--preserve-every", "1")
    assert r.returncode == 0, r.stderr
    recs = {d["model"]: d for d in map(json.loads, out.read_text().splitlines())}
    assert set(recs) == {"tv:squeezenet1_1", "tv:mobilenet_v3_small"}

    sq = recs["tv:squeezenet1_1"]
    assert sq["status"] == "exact", sq
    assert 0 < sq["expanded"] <= sq["candidates"] and sq["max_rel"] < 1e-12
    assert sq["input"] == [3, 64, 64]
    assert sq["preserve_passed"] is True and sq["preserve_kernel_max_rel"] < 1e-12
    assert {"build", "expand", "contract", "compare"} <= set(sq["stage_seconds"])
    # the 1.5M-parameter model is over the bound: counted as skipped with the bound, not run
    mb = recs["tv:mobilenet_v3_small"]
    assert mb["status"] == "skipped" and "> bound 1M" in mb["reason"]

    again = _sweep(out, "--models", models, "--max-params", "1e6")
    assert again.returncode == 0 and "0 to run" in again.stdout
    assert len(out.read_text().splitlines()) == 2

    zoo = load_script("zoo_sweep", "benchmarks")
    text = zoo.summary(out, None)
    assert "Built and run: 1; exact: 1 (100.0% of those built)." in text
    assert "| skipped | 1 |" in text and "Skipped above the parameter bound: 1 models" in text


def test_summary_groups_failures_and_explains_preserve_misses(tmp_path):
    zoo = load_script("zoo_sweep", "benchmarks")
    out = tmp_path / "zoo.jsonl"
    recs = [
        {"model": "timm:a_1", "status": "failed", "stage": "forward", "reason": "RuntimeError: size 26 != 27"},
        {"model": "timm:b_2", "status": "failed", "stage": "forward", "reason": "RuntimeError: size 13 != 14"},
        {"model": "tv:c", "status": "exact", "max_rel": 3e-15, "expanded": 2, "candidates": 3,
         "preserve_passed": False, "preserve_max_rel": 4e-9, "preserve_kernel_max_rel": 9e-15,
         "preserve_noise_floor": 1.2e-8},  # fmt: skip
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = zoo.summary(out, 10)
    assert "2 x `forward: RuntimeError: size N != N`: a_1, b_2" in text
    assert "Built and run: 3; exact: 1 (33.3% of those built)." in text
    assert "0 of 1 equal to the original" in text and "moves by 1.2e-08" in text
