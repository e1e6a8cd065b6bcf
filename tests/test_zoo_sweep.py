"""The zoo sweep's harness (benchmarks/zoo_sweep.py) on two small torchvision models: a run in a
worker process with the chains and a branch strategy in one pass, the parameter bound, resuming
per strategy, the record's fields and the summaries. The sweep itself is a benchmark; this keeps
its machinery from rotting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "zoo_sweep.py"


def zoo_blind() -> float:
    return load_script("zoo_sweep", "benchmarks").BLIND


def _sweep(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--workers", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_sweep_runs_skips_resumes_and_summarises(tmp_path):
    out = tmp_path / "zoo.jsonl"
    models = "tv:squeezenet1_1,tv:mobilenet_v3_small"
    r = _sweep(out, "--models", models, "--max-params", "1e6", "--preserve-every", "1", "--strategies", "ck+cl+fc,dbb")
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

    # the branch strategy ran on the same built model, in its own file, at its kind's default rate
    dbb = {d["model"]: d for d in map(json.loads, (tmp_path / "zoo_dbb.jsonl").read_text().splitlines())}
    sq_dbb = dbb["tv:squeezenet1_1"]
    assert sq_dbb["status"] == "exact" and sq_dbb["strategy"] == "dbb" and sq_dbb["rate"] is None, sq_dbb
    assert sq_dbb["input"] == sq["input"] and sq_dbb["max_rel"] < 1e-12
    # the check means something: the model's output depends on its input
    assert sq_dbb["input_sensitivity"] == sq["input_sensitivity"] > zoo_blind()
    assert sq_dbb["same_types"] is True and "randomize" in sq_dbb["stage_seconds"]
    assert sq_dbb["left_alone"]["1x1 convolution: these branches need a larger kernel"] > 0
    assert "preserve_passed" not in sq_dbb
    assert dbb["tv:mobilenet_v3_small"]["status"] == "skipped"

    again = _sweep(out, "--models", models, "--max-params", "1e6", "--strategies", "ck+cl+fc,dbb")
    assert again.returncode == 0 and "0 to run" in again.stdout
    assert len(out.read_text().splitlines()) == 2
    # a strategy without a file yet: the models run again for it alone
    rep = _sweep(out, "--models", "tv:squeezenet1_1", "--strategies", "dbb,rep")
    assert rep.returncode == 0 and "1 to run" in rep.stdout
    assert len((tmp_path / "zoo_dbb.jsonl").read_text().splitlines()) == 2
    (sq_rep,) = map(json.loads, (tmp_path / "zoo_rep.jsonl").read_text().splitlines())
    assert sq_rep["status"] == "exact" and sq_rep["strategy"] == "rep"

    zoo = load_script("zoo_sweep", "benchmarks")
    text = zoo.summary(out, None)
    assert "Built and run: 1; exact: 1 (100.0% of those built)." in text
    assert "| skipped | 1 |" in text and "Skipped above the parameter bound: 1 models" in text

    table = zoo.strategy_table(out, ["ck+cl+fc", "dbb", "rep"], 2)
    assert "| `dbb` | 2 of 2 | 1 | 1 | 0 | 0 | 0 | 1 | 100.0% | 100.0% |" in table
    assert "| `rep` | 1 of 2 | 1 | 1 | 0 | 0 | 0 | 0 | 100.0% | 100.0% |" in table
    assert "No model inexact or failed." in table


def test_summary_groups_failures_and_explains_preserve_misses(tmp_path):
    zoo = load_script("zoo_sweep", "benchmarks")
    out = tmp_path / "zoo.jsonl"
    recs = [
        {"model": "timm:a_1", "status": "failed", "stage": "forward", "reason": "RuntimeError: size 26 != 27"},
        {"model": "timm:b_2", "status": "failed", "stage": "forward", "reason": "RuntimeError: size 13 != 14"},
        {
            "model": "tv:c",
            "status": "exact",
            "max_rel": 3e-15,
            "expanded": 2,
            "candidates": 3,
            "preserve_passed": False,
            "preserve_max_rel": 4e-9,
            "preserve_kernel_max_rel": 9e-15,
            "preserve_noise_floor": 1.2e-8,
        },  # fmt: skip
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = zoo.summary(out, 10)
    assert "2 x `forward: RuntimeError: size N != N`: a_1, b_2" in text
    assert "Built and run: 3; exact: 1 (33.3% of those built)." in text
    assert "0 of 1 equal to the original" in text and "moves by 1.2e-08" in text


def test_strategy_table_lists_failures_and_refusals(tmp_path):
    zoo = load_script("zoo_sweep", "benchmarks")
    out = tmp_path / "zoo.jsonl"
    recs = [
        {
            "model": "tv:a",
            "status": "exact",
            "max_rel": 2e-15,
            "same_types": True,
            "left_alone": {"1x1": 3},
            "input_sensitivity": 0.0,
        },  # fmt: skip
        {
            "model": "tv:b",
            "status": "inexact",
            "max_rel": 1e-3,
            "same_types": True,
            "reason": "output: 0.001",
            "noise_floor": 5e-4,
            "noise_floor_all": 2e-3,
            "layer_max_rel": 4e-16,
        },
        {"model": "tv:c", "status": "failed", "stage": "contract", "reason": "RuntimeError: bad"},
        {"model": "tv:d", "status": "failed", "stage": "build", "reason": "TypeError: no"},
        {"model": "tv:e", "status": "nothing", "left_alone": {"1x1": 2, "kernel 1x3": 1}},
    ]
    (tmp_path / "zoo_acb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    table = zoo.strategy_table(out, ["acb"], 9)
    # built: all but the build failure; exact share over the built models with a layer expanded (3)
    row = (
        "| `acb` | 5 of 9 | 4 | 1 | 1 (1 of 1 measured within the floor) | 2 | 1 | 0 | 33.3% | 66.7% | 2e-15 | 2 of 2 |"
    )
    assert row in table
    assert "- `acb` (6 layers): 5 x 1x1; 1 x kernel 1x3" in table
    assert "- `acb`: 1 of 1 exact models measured (a)" in table
    assert "- `acb` inexact: tv:b: output: 0.001 (the contracted model's output moves by 0.0005 under 1e-15" in table
    assert (
        "by 0.002 under 1e-16 on every tensor; its expanded layers, each on its own input, are off by 4e-16)" in table
    )
    assert "- `acb` failed at contract: tv:c: RuntimeError: bad" in table


def test_order_by_size_and_randomized_branches(tmp_path):
    zoo = load_script("zoo_sweep", "benchmarks")
    out = tmp_path / "zoo.jsonl"
    out.write_text(json.dumps({"model": "tv:big", "params": 9}) + "\n" + json.dumps({"model": "tv:small", "params": 1}))
    (tmp_path / "zoo_rep.jsonl").write_text(json.dumps({"model": "tv:mid", "params": 5}) + "\n")
    assert zoo.order_by_size(["tv:big", "tv:mid", "tv:small"], out) == ["tv:small", "tv:mid", "tv:big"]

    import expandctl

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).double().eval()
    for strategy in ("dbb", "orepa"):
        big = expandctl.expand(model, strategy=strategy, seed=0)
        zoo.randomize_expanded(big)
        bns = [m for m in big.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and all(bn.running_mean.abs().min() > 0 and (bn.running_var != 1).all() for bn in bns)
        scales = [p for n, p in big.named_parameters() if n.endswith("scale")]
        assert (strategy == "orepa") == bool(scales)
        assert all(((s >= 0.5) & (s < 1.5)).all() and s.std() > 0 for s in scales)

    # a zero-initialised head (timm's Mixer, gMLP) would make every output zero: re-initialised
    head = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    torch.nn.init.zeros_(head[1].weight)
    assert zoo._reset_zero_weights(head) == ["1"] and head[1].weight.abs().min() > 0

    # each expanded layer's own contraction against its branches, on the input it sees in the model
    big = expandctl.expand(model, strategy="rep", seed=0)
    zoo.randomize_expanded(big)
    assert zoo._layer_error(big, [3, 8, 8]) < 1e-13
    layer = big[0]
    good = layer.contract

    def off():
        conv = good()
        with torch.no_grad():
            conv.weight[0, 0, 1, 1] += 0.1
        return conv

    layer.contract = off
    assert zoo._layer_error(big, [3, 8, 8]) > 1e-4
    assert layer.forward_mode == "fused"  # put back as it was


def test_write_docs_fills_the_markers_and_says_how_much_is_covered(tmp_path, monkeypatch):
    zoo = load_script("zoo_sweep", "benchmarks")
    out = tmp_path / "zoo.jsonl"
    out.write_text(json.dumps({"model": "tv:a", "status": "exact", "max_rel": 1e-15, "params": 1_000}) + "\n")
    sizes = (("a", 1e6), ("b", 2.5e6))
    recs = [{"model": f"tv:{m}", "status": "exact", "max_rel": 1e-15, "params": p} for m, p in sizes]
    (tmp_path / "zoo_acb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    words = "cover 2 of 3 models so far, smallest first (up to 2.5M parameters)"
    assert zoo.coverage(out, ["ck+cl+fc", "acb"], 3) == words
    assert zoo.coverage(out, ["ck+cl+fc", "acb"], 2) == "cover the whole zoo (2 models)"
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("x <!-- zoo:progress -->old<!-- /zoo:progress -->.\n<!-- zoo:table -->\nold\n"
                                        "<!-- /zoo:table -->\nend\n")  # fmt: skip
    (tmp_path / "docs" / "zoo.md").write_text("# zoo\n<!-- zoo:summary -->\nold\n<!-- /zoo:summary -->\n")
    monkeypatch.setattr(zoo, "ROOT", tmp_path)
    table = zoo.strategy_table(out, ["ck+cl+fc", "acb"], 3)
    zoo.write_docs(out, ["ck+cl+fc", "acb"], 3, table, table + "\nmore")
    readme = (tmp_path / "README.md").read_text()
    assert "x <!-- zoo:progress -->cover 2 of 3 models so far" in readme and "old" not in readme
    assert "| `acb` | 2 of 3 | 2 | 2 |" in readme and "Layers left alone" not in readme  # the table only
    assert readme.endswith("<!-- /zoo:table -->\nend\n")
    doc = (tmp_path / "docs" / "zoo.md").read_text()
    assert doc.startswith("# zoo\n<!-- zoo:summary -->\n| strategy |") and doc.endswith("more\n<!-- /zoo:summary -->\n")


def test_layer_error_runs_a_layer_that_the_model_applies_twice():
    """A shared layer (a detection head over several feature levels) gets each call's own input."""
    import torch

    import expandctl

    zoo = load_script("zoo_sweep", "benchmarks")

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            a = torch.nn.functional.avg_pool2d(self.conv(x), 2)
            return self.conv(a) + a  # 4x4 + 4x4: the second call must see its own (4x4) input

    torch.manual_seed(0)
    big = expandctl.expand(Shared().double().eval(), "dbb", seed=0)
    assert zoo._layer_error(big, (3, 8, 8)) < 1e-12
