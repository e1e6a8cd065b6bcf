"""The graph sweep's harness (benchmarks/graph_sweep.py): the timm oracle on one small model (its
record's fields, our error and parameter count against timm's own merge), the zoo part through the
worker protocol, and the summary tables and docs markers on a small fake results file. The sweep
itself is a benchmark; this keeps its machinery from rotting."""

import json
import multiprocessing as mp

import pytest
from helpers import load_script

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def gs():
    return load_script("graph_sweep", "benchmarks")


def test_oracle_record_against_timms_merge(gs):
    # repvgg_a0 at 32 px, one training step, no ONNX timing: the fields, and the oracle's verdict
    rec = gs.run_oracle("repvgg_a0", size=32, steps=1, batches=1, rounds=0)
    assert rec["status"] == "exact", rec.get("reason")
    assert rec["family"] == "byobnet" and rec["classes"] == ["RepVggBlock"] and rec["input"] == [3, 32, 32]
    assert rec["max_rel"] <= 1e-9 and rec["timm_max_rel"] <= 1e-9
    assert rec["worst_region_error"] <= 1e-9
    # both merges remove the training-time branches; ours holds no more than timm's
    assert rec["params_ours"] <= rec["params_timm"] < rec["params"]
    assert 0 < rec["regions_merged"] == rec["regions_found"] and rec["opaque"] == {}
    # each RepVGG block: a 3x3 and a 1x1 conv with their BatchNorms, plus the identity's BatchNorm, summed
    assert sum(rec["merged_patterns"].values()) == rec["regions_merged"]
    assert rec["merged_patterns"]["2 layers + BatchNorm, add"] > 0 and rec["params_ours_unused"] == 0
    assert rec["contract_seconds"] > 0 and {"build", "train", "timm", "contract"} <= set(rec["stage_seconds"])
    assert "onnx_ratio" not in rec


def test_the_oracle_finds_timms_reparameterisable_families(gs):
    modules = gs.reparam_modules()
    assert {"byobnet", "fastvit", "repvit", "repghost", "levit", "mobilenetv3"} - set(modules) == {"mobilenetv3"}
    model = timm.create_model("mobileone_s0", pretrained=False, num_classes=10, device="meta")
    assert gs.reparam_classes(model) == ["MobileOneBlock"]
    assert gs.reparam_classes(timm.create_model("resnet10t", pretrained=False, device="meta")) == []


def test_zoo_part_through_the_worker_protocol(gs):
    parent, child = mp.Pipe()
    parent.send(("tv:squeezenet1_1", ["zoo"]))
    parent.send(None)
    gs._worker(40_000_000, 0, child)
    part, rec = parent.recv()
    assert parent.recv() is None
    assert part == "zoo" and rec["model"] == "tv:squeezenet1_1" and rec["input"] == [3, 64, 64]
    # squeezenet: convs and ReLUs only, nothing linear to merge, and the result is the model itself
    assert rec["status"] == "nothing" and rec["regions_merged"] == 0 and rec["max_rel"] == 0.0
    assert rec["params_before"] == rec["params_after"] and rec["untraceable"] is False


def test_unused_tensors_counts_what_the_graph_never_reads(gs):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from expandctl.graph import contract_graph

    class BNAct(nn.BatchNorm2d):  # timm's BatchNormAct2d: F.batch_norm, then its own activation child
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.ReLU()

        def forward(self, x):
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
            return self.act(y)

    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
    wrapped = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BNAct(8)).eval()
    x = torch.randn(1, 3, 8, 8)
    assert gs.unused_tensors(contract_graph(plain, x)) == 0
    merged = contract_graph(wrapped, x)
    assert len(merged.graph_plan.merged) == 1
    # whatever the engine leaves behind on the container, the count is what the graph does not read
    read = sum(t.numel() for n, t in merged.named_parameters() if n.startswith("merged."))
    assert gs.unused_tensors(merged) == gs._count(merged) - read


def _oracle_rec(name, family, params, timm_params, ours, err, ratio=1.0, **extra):
    return {
        "model": f"timm:{name}",
        "family": family,
        "classes": ["RepVggBlock"],
        "input": [3, 64, 64],
        "status": "exact" if err <= 1e-9 else "inexact",
        "regions_merged": 3,
        "regions_found": 4,
        "params": params,
        "params_timm": timm_params,
        "params_ours": ours,
        "timm_max_rel": 1e-16,
        "max_rel": err,
        "contract_seconds": 1.25,
        "onnx_ratio": ratio,
        "opaque": {},
        **extra,
    }


def test_summary_tables_and_docs_markers(gs, tmp_path):
    out = tmp_path / "graph_sweep.jsonl"
    oracle = [
        _oracle_rec(
            "repvgg_a0", "byobnet", 1000, 800, 800, 2e-16, 0.98, onnx_ops_ours={"Conv": 2}, onnx_ops_timm={"Conv": 2}
        ),
        _oracle_rec("levit_128s", "levit", 500, 400, 450, 7e-16, 1.02, left_alone={"a linear layer": 12}),
        _oracle_rec(
            "efficientvim_m1",
            "efficientvim",
            600,
            500,
            500,
            8e-16,
            0.9,
            onnx_ops_timm={"Conv": 2, "Mul": 4},
            onnx_ops_ours={"Conv": 2, "Mul": 3, "Add": 1},
            params_ours_unused=1234,
        ),
        {"model": "timm:broken", "family": "x", "status": "failed", "stage": "train", "reason": "RuntimeError: no"},
    ]
    zoo = [
        {
            "model": "tv:resnet18",
            "status": "merged",
            "max_rel": 3e-15,
            "regions_merged": 20,
            "regions_found": 20,
            "params_before": 100,
            "params_after": 90,
            "contract_seconds": 4.0,
            "left_alone": {},
            "opaque": {},
        },
        {
            "model": "timm:odd",
            "status": "nothing",
            "max_rel": 0.0,
            "regions_merged": 0,
            "regions_found": 1,
            "params_before": 50,
            "params_after": 50,
            "contract_seconds": 2.0,
            "input_sensitivity": 1e-9,
            "left_alone": {"the float64 check failed": 1},
            "opaque": {"blocks.0": "TraceError: symbolically traced"},
        },
        {"model": "tv:huge", "status": "skipped", "reason": "too big"},
        {
            "model": "timm:whole",
            "status": "untraceable",
            "max_rel": 0.0,
            "regions_merged": 0,
            "regions_found": 0,
            "params_before": 5,
            "params_after": 5,
            "contract_seconds": 0.5,
            "opaque": {"Whole": "TraceError: flow"},
        },
        {
            "model": "timm:amplifier",
            "status": "inexact",
            "max_rel": 7e-8,
            "regions_merged": 1,
            "regions_found": 1,
            "params_before": 10,
            "params_after": 8,
            "contract_seconds": 1.0,
            "worst_region_error": 4e-15,
            "noise_floor": 1.2e-8,
            "noise_floor_all": 1.4e-7,
        },
    ]
    (tmp_path / "graph_sweep_oracle.jsonl").write_text("".join(json.dumps(r) + "\n" for r in oracle))
    (tmp_path / "graph_sweep_zoo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in zoo))
    texts = gs.summary(out)

    table = texts["oracle"]
    assert (
        "| byobnet | repvgg_a0 | RepVggBlock | 64x64 | 3 / 4 | 1,000 | 800 | 800 | 1.0e-16 | 2.0e-16 | 1.2 | 0.98 "
        "| yes |" in table
    )
    assert "3 models from 3 families: 3 within 1e-09" in table
    assert "equal to or below timm's in 2 of 3" in table
    assert "onnxruntime latency ours / timm: 0.90 to 1.02 (median 0.98)" in table
    assert "Where both ONNX graphs hold the same ops (1 models) the ratio is 0.98 to 0.98" in table
    assert "- efficientvim_m1: Add 0 vs 1, Mul 4 vs 3" in table
    assert "The merged GraphModule of 1 models also holds tensors" in table and "efficientvim_m1 1,234." in table
    assert "- levit_128s: 50 more (12 x a linear layer)" in table
    assert table.count("| no |") == 1 and table.count("| - |") == 1  # levit_128s: no op counts recorded
    assert "- broken (x): failed at train: RuntimeError: no" in table

    text = texts["zoo"]
    assert "Models: 5 (2 tv, 3 timm)." in text
    assert "Untraceable as a whole (returned unchanged): whole (TraceError: flow)" in text
    assert "| merged | 1 |" in text and "| nothing | 1 |" in text and "| skipped | 1 |" in text
    assert "| inexact | 1 |" in text
    assert "Regions merged: 21 of 22 found; parameters + buffers 165 -> 153 (7.3% fewer)" in text
    assert "inexact (above 1e-09): 1" in text and "7.0e-08 (amplifier)" in text
    assert (
        "- amplifier: off by 7e-08, its merged regions each by at most 4e-15; the original model's output moves "
        "by 1.2e-08 under 1e-15 relative noise on its weights, by 1.4e-07 under 1e-16 on every tensor" in text
    )
    assert "- 1 x the float64 check failed" in text
    assert "1 of them have an output that moves by less than 1e-06" in text and "weak: odd." in text
    assert "1 x `TraceError: symbolically traced`: odd:blocks.0" in text

    doc = tmp_path / "graph.md"
    doc.write_text(
        "# head\n<!-- graph:oracle -->\nSTALE\n<!-- /graph:oracle -->\nmiddle\n<!-- graph:zoo -->\n"
        "<!-- /graph:zoo -->\ntail\n"
    )
    assert gs.write_docs(texts, doc) == ["oracle", "zoo"]
    new = doc.read_text()
    assert "STALE" not in new and table in new and text in new
    assert new.startswith("# head\n") and "\nmiddle\n" in new and new.endswith("tail\n")
    assert gs.write_docs(texts, doc) == []  # unchanged on a second run
