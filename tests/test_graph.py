"""contract_graph / contract --graph: merge the linear regions of models expandctl did not build."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import graph_blocks as B
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import expandctl
from expandctl.cli import app
from expandctl.graph import contract_graph, plan_graph

runner = CliRunner()


def _error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = a(x)
        return float((b(x) - ref).abs().max() / ref.abs().max())


def _kinds(module: nn.Module) -> list[type]:
    return [type(m) for m in module.modules()]


BLOCKS = {
    "repvgg": lambda: B.RepVGGBlock(8, 8),
    "repvgg_stride2": lambda: B.RepVGGBlock(8, 12, stride=2),
    "repvgg_grouped": lambda: B.RepVGGBlock(8, 8, groups=4),
    "acnet": lambda: B.ACBlock(8, 8),
    "acnet_5x5_stride2": lambda: B.ACBlock(8, 6, k=5, stride=2),
    "mobileone_dw": lambda: B.MobileOneBlock(8, 8, groups=8),
    "mobileone_dense": lambda: B.MobileOneBlock(8, 12, stride=2),
    "dbb": lambda: B.DiverseBranchBlock(8, 8),
    "dbb_stride2": lambda: B.DiverseBranchBlock(8, 12, stride=2),
    "orepa": lambda: B.OREPABlock(8, 8),
    "repmixer": lambda: B.RepMixer(8),
    "expandnets_ck": lambda: B.ExpandNetsChain(8, 8),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_each_block_becomes_one_layer(name):
    block = B.settle(BLOCKS[name](), shape=(8, 12, 12)).double()
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    gm = contract_graph(block, x)
    plan = gm.graph_plan
    assert len(plan.merged) == 1, [r.to_dict() for r in plan.regions]
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1, gm.code
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    assert _error(block, gm, x) <= 1e-12
    assert plan.params_after < plan.params_before
    assert _error(block, gm, torch.randn(3, 8, 17, 9, dtype=torch.float64)) <= 1e-12  # another size: same layer


def test_the_blocks_network_merges_every_region_float64_and_float32():
    net = B.settle(B.BlocksNet())
    x = torch.randn(2, 3, 32, 32)
    gm64 = contract_graph(copy.deepcopy(net).double(), x.double())
    assert _error(net.double(), gm64, x.double()) <= 1e-12
    net = net.float()
    gm = contract_graph(net, x)
    assert _error(net, gm, x) <= 1e-5
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    # every conv / linear of the model sits in one merged region: one layer per region
    layers = [m for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == len(gm.graph_plan.merged) == 9
    assert not gm.graph_plan.left_alone or all("grows" not in i["reason"] for i in gm.graph_plan.left_alone)


def test_original_model_is_not_changed():
    net = B.settle(B.RepVGGBlock(4, 4), shape=(4, 8, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    contract_graph(net, torch.randn(1, 4, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(net.rbr_identity, nn.BatchNorm2d)


@pytest.mark.parametrize(
    "model, needle",
    [
        (B.BiasThenPadded(), "after a bias or shift"),
        (B.PaddedThenPadded(), "after a 3x3 kernel"),
        (B.AvgExcludingPad(), "count_include_pad=False"),
        (B.ReadOutside(), "read by 2 operations"),
    ],
)
def test_must_not_merge_cases_are_left_alone_with_the_reason(model, needle):
    model = B.settle(model, shape=(4, 10, 10)).double()
    x = torch.randn(2, 4, 10, 10, dtype=torch.float64)
    gm = contract_graph(model, x)
    reasons = [i["reason"] for i in gm.graph_plan.left_alone]
    assert any(needle in r for r in reasons), reasons
    assert _error(model, gm, x) <= 1e-12
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    original = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(original)  # nothing merged across the refused step


def test_nonlinearity_stops_a_region():
    model = B.NonLinearBetween().double()
    gm = contract_graph(model, torch.randn(1, 4, 6, 6, dtype=torch.float64))
    assert not gm.graph_plan.merged and len([m for m in gm.modules() if isinstance(m, nn.Conv2d)]) == 2


def test_untraceable_submodule_is_an_opaque_leaf_and_the_rest_merges():
    model = B.settle(B.Untraceable(), shape=(4, 8, 8)).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    gm = contract_graph(model, x)
    assert "branchy" in gm.graph_plan.opaque and "control flow" in gm.graph_plan.opaque["branchy"]
    assert len(gm.graph_plan.merged) == 1 and gm.graph_plan.merged[0].modules == ["bn", "conv"]
    assert _error(model, gm, x) <= 1e-12 and _error(model, gm, -x) <= 1e-12


def test_untraceable_model_is_returned_whole():
    class Whole(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(x) if x.mean() > 0 else x

    gm = contract_graph(Whole(), torch.randn(1, 2, 4, 4))
    assert "Whole" in gm.graph_plan.opaque and not gm.graph_plan.regions
    x = torch.randn(1, 2, 4, 4).abs()
    assert torch.equal(gm(x), gm.model(x))


def test_expanded_model_contracts_then_merges_its_batchnorms():
    """An expandctl model contracted by contract(), then the graph folds the BatchNorms after its convs."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    )
    big = B.settle(expandctl.expand(model, strategy="ck+cl", rate=2, seed=0), shape=(3, 8, 8))
    small = expandctl.contract(big).double()
    gm = contract_graph(small, torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert len(gm.graph_plan.merged) == 2
    assert _error(small, gm, torch.randn(2, 3, 8, 8, dtype=torch.float64)) <= 1e-12


def test_plan_graph_builds_nothing():
    model = B.settle(B.ACBlock(4, 4), shape=(4, 8, 8))
    plan = plan_graph(model, (torch.randn(1, 4, 8, 8),))
    assert len(plan.merged) == 1 and plan.params_after < plan.params_before
    assert plan.to_dict()["regions"][0]["became"].startswith("Conv2d(4 -> 4, 3x3")


def test_linear_region_with_layer_scale_and_difference():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(6, 5)
            self.gamma = nn.Parameter(torch.rand(5) + 0.5)
            self.bn = nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.gamma * (self.a(x) - self.b(x)) + 1.5)

    head = B.settle(Head(), shape=(6,)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    gm = contract_graph(head, x)
    assert [type(m) for m in gm.children()] == [nn.Linear] or len(gm.graph_plan.merged) == 1
    assert _error(head, gm, x) <= 1e-12


# ---------------------------------------------------------------------------- never an inexact result
@settings(deadline=None)
@given(
    k1=st.sampled_from([1, 2, 3, (1, 3), (3, 1), 5]),
    k2=st.sampled_from([1, 3, (1, 3)]),
    pad1=st.integers(0, 2),
    pad2=st.integers(0, 1),
    stride=st.sampled_from([1, 2]),
    dilation=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    serial=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_pair_of_convs_merges_exactly_or_is_left_alone(
    k1, k2, pad1, pad2, stride, dilation, groups, bias, serial, seed
):
    """Two convs in series or in parallel, with every setting: the merged model always computes what the
    original does in float64 (a merge that is not exactly one conv must be refused, never approximated)."""
    torch.manual_seed(seed)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, k1, stride, pad1, dilation, groups, bias=bias)
            self.b = nn.Conv2d(4, 4, k2, 1 if serial else stride, pad2, 1, groups, bias=bias)
            self.bn = nn.BatchNorm2d(4)
            with torch.no_grad():
                self.bn.running_mean.uniform_(-1, 1)
                self.bn.running_var.uniform_(0.5, 2)

        def forward(self, x):
            if serial:
                return self.bn(self.b(self.a(x)))
            return self.bn(self.a(x) + self.b(x))

    model = Pair().double().eval()
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError:
        return  # shapes that do not fit together
    gm = contract_graph(model, x)
    assert _error(model, gm, x) <= 1e-12, gm.graph_plan.to_dict()
    y = torch.randn(1, 4, 9, 13, dtype=torch.float64)
    try:
        with torch.no_grad():
            model(y)
    except RuntimeError:
        return
    assert _error(model, gm, y) <= 1e-12


# ---------------------------------------------------------------------------- the command
def _foreign(tmp_path: Path) -> Path:
    """A pickled BlocksNet with its module file beside it, as a user would have it."""
    shutil.copy(Path(B.__file__), tmp_path / "graph_blocks.py")
    net = B.settle(B.BlocksNet())
    torch.save(net, tmp_path / "foreign.pt")
    return tmp_path / "foreign.pt"


def test_cli_contract_graph_onnx_and_verify(tmp_path, monkeypatch):
    """The issue's commands on a pickled model of foreign blocks whose module file sits beside it."""
    src = _foreign(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def run(*args):
        return runner.invoke(app, list(args))

    r = run("contract", src.name, "--graph", "--trust-pickle", "--input-shape", "3,32,32", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["dry_run"] and plan["regions_merged"] == 9 and not (tmp_path / "deploy.onnx").exists()
    assert {"input", "output", "modules", "became", "error"} <= set(plan["regions"][0])
    r = run("contract", src.name, "--graph", "--trust-pickle", "--input-shape", "3,32,32", "-o", "deploy.onnx")
    assert r.exit_code == 0, r.output
    assert "9 linear regions merged" in r.output and "wrote deploy.onnx" in r.stdout
    ops = [n.op_type for n in onnx.load(tmp_path / "deploy.onnx").graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") + ops.count("Gemm") + ops.count("MatMul") == 9
    r = run("verify", src.name, "deploy.onnx", "--trust-pickle", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["passed"]


def test_cli_contract_graph_refuses_a_wrong_merge_and_writes_nothing(tmp_path, monkeypatch):
    """An algebra error in a merged layer (1e-3 relative on one kernel) fails the check: exit 1, no file."""
    import expandctl.workflows.graph as W

    real = W.contract_graph

    def broken(model, example):
        gm = real(model, example)
        layer = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            layer.weight[0].mul_(1 + 1e-3)
        return gm

    monkeypatch.setattr(W, "contract_graph", broken)
    model = B.settle(B.RepVGGBlock(3, 8, stride=2))
    torch.save(model, tmp_path / "m.pt")
    monkeypatch.syspath_prepend(str(Path(B.__file__).parent))
    out = tmp_path / "m.onnx"
    r = runner.invoke(app, ["contract", str(tmp_path / "m.pt"), "--graph", "--trust-pickle", "--input-shape", "3,16,16",
                            "-o", str(out), "--json"])  # fmt: skip
    assert r.exit_code == 1, r.output
    data = json.loads(r.stdout)
    assert data["exit_code"] == 1 and not out.exists()


def test_cli_contract_graph_usage_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(B.__file__).parent))
    torch.save(B.settle(B.ACBlock(3, 4)), tmp_path / "m.pt")
    r = runner.invoke(app, ["contract", str(tmp_path / "m.pt"), "--graph", "--trust-pickle", "--input-shape", "3,8,8",
                            "-o", str(tmp_path / "m.pt.out.pt")])  # fmt: skip
    assert r.exit_code == 2 and ".onnx" in r.stderr and ".pt2" in r.stderr
    r = runner.invoke(app, ["contract", str(tmp_path / "m.pt"), "--graph", "--trust-pickle", "--input-shape", "3,8,8"])
    assert r.exit_code == 2 and "-o" in r.stderr
    r = runner.invoke(app, ["contract", str(tmp_path / "m.pt"), "--graph", "--input-shape", "3,8,8", "--dry-run"])
    assert r.exit_code == 3  # a foreign pickle without --trust-pickle


def test_cli_contract_graph_pt2_loads_back(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(B.__file__).parent))
    model = B.settle(B.MobileOneBlock(3, 6, stride=2))
    torch.save(model, tmp_path / "m.pt")
    r = runner.invoke(app, ["contract", str(tmp_path / "m.pt"), "--graph", "--trust-pickle", "--input-shape",
                            "3,16,16", "-o", str(tmp_path / "m.pt2"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert any(c["kind"] == "merged-vs-pt2" for c in data["checks"])
    program = torch.export.load(tmp_path / "m.pt2").module()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (program(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()
    # expandctl reads it back only when trusted: torch.export.load unpickles the weights in the archive
    r = runner.invoke(app, ["verify", str(tmp_path / "m.pt"), str(tmp_path / "m.pt2"), "--trust-pickle", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["input_shape"] == [3, 16, 16]  # recorded by the program, not by the pickle
    r = runner.invoke(app, ["inspect", str(tmp_path / "m.pt2")])
    assert r.exit_code == 3 and "torch.export" in r.stderr


def test_relu_network_with_functional_padding_and_avg_pool():
    """F.pad zero + avg_pool2d(count_include_pad) + a valid conv: one conv."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1, bias=False)
            self.out = nn.Conv2d(3, 5, 3)

        def forward(self, x):
            return self.out(F.avg_pool2d(F.pad(self.conv(x), [1, 1, 1, 1]), 3, 1, 1))

    net = Net().double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    gm = contract_graph(net, x)
    assert len(gm.graph_plan.merged) == 1 and _error(net, gm, x) <= 1e-12


# ---------------------------------------------------------------------------- models that have branches
def test_expand_plan_says_when_a_layer_sits_in_a_reparameterisable_block(tmp_path, monkeypatch):
    plan = expandctl.plan(B.HasBlocks(), strategy="rep")
    blocks = {e.path: e.block for e in plan.expanded}
    assert blocks == {"stem": None, "block.a": "WithOwnMerge at block"}
    assert "1 of the 2 layers to expand already sit in re-parameterisable blocks (WithOwnMerge)" in plan.in_blocks()
    monkeypatch.chdir(tmp_path)
    torch.save(B.HasBlocks(), "m.pt")
    r = runner.invoke(app, ["expand", "m.pt", "--trust-pickle", "--strategy", "rep", "--input-shape", "3,8,8",
                            "--dry-run", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert any("re-parameterisable blocks" in w for w in data["warnings"])
    r = runner.invoke(app, ["expand", "m.pt", "--trust-pickle", "--strategy", "rep", "--input-shape", "3,8,8",
                            "--dry-run"])  # fmt: skip
    assert r.exit_code == 0 and "merges its blocks" in r.output.replace("\n", " ")


def test_fold_bn_folds_timm_batchnormact_and_the_checkpoint_loads(tmp_path):
    pytest.importorskip("timm")
    model = B.settle(B.TimmStyle(), shape=(3, 16, 16))
    src = tmp_path / "m.pt"
    expandctl.save(model, src, arch="graph_blocks:TimmStyle", input_shape=(3, 16, 16))
    out = tmp_path / "folded.pt"
    r = runner.invoke(app, ["contract", str(src), "--fold-bn", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["folded_bn"] == [{"conv": "conv", "bn": "bn", "neutral": True}]
    loaded = expandctl.load_checkpoint(out).model.eval()
    assert loaded.conv.bias is not None and type(loaded.bn).__name__ == "BatchNormAct2d"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()
        assert torch.allclose(loaded.bn.running_mean, torch.zeros(8))


def test_reshape_that_keeps_the_last_dim_inside_a_linear_region():
    """LeViT's LinearNorm: ``bn(linear(x).flatten(0, 1)).reshape_as(x)`` on tokens is one linear layer."""

    class LinearNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 6, bias=False)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.linear(x).flatten(0, 1)).reshape_as(x)

    m = B.settle(LinearNorm(), shape=(5, 6)).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    gm = contract_graph(m, x)
    assert len(gm.graph_plan.merged) == 1 and not any(isinstance(t, nn.BatchNorm1d) for t in gm.modules())
    assert _error(m, gm, x) <= 1e-12
    assert plan_graph(m, x).params_after == gm.graph_plan.params_after  # a bare tensor is an input too


def test_reshape_of_a_channel_first_map_stops_the_region():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4 * 9, 5)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    m = Flat().double().eval()
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    gm = contract_graph(m, x)
    assert not gm.graph_plan.merged and _error(m, gm, x) <= 1e-12


def test_children_of_an_untraceable_module_are_contracted_on_the_inputs_they_see():
    """A block with shape-dependent control flow stays whole, but the conv -> BN pair inside it merges
    (timm's EfficientViT-MSRA attention and TinyViT blocks)."""

    class Windowed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
            self.resolution = 8

        def forward(self, x):
            if x.shape[-1] > self.resolution:  # data-dependent for fx: the module is opaque
                x = x[..., : self.resolution, : self.resolution]
            return torch.relu(self.inner(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.block = Windowed()

        def forward(self, x):
            return self.block(self.stem(x))

    net = B.settle(Net(), shape=(3, 10, 10)).double()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    gm = contract_graph(net, x)
    plan = gm.graph_plan
    assert "block" in plan.opaque
    assert [r.modules for r in plan.merged] == [["block.inner.0", "block.inner.1"]]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert gm.get_submodule("block").resolution == 8
    assert _error(net, gm, x) <= 1e-12 and _error(net, gm, torch.randn(1, 3, 6, 6, dtype=torch.float64)) <= 1e-12


def test_optional_forward_arguments_keep_their_defaults():
    """``forward(x, mask=None)`` with ``if mask is not None`` (timm's Hiera): traced as called, without a mask."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x, mask=None):
            y = self.bn(self.conv(x))
            if mask is not None:
                y = y * mask.view(-1, 1, 1, 1)
            return y

    m = B.settle(Masked(), shape=(3, 8, 8)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gm = contract_graph(m, x)
    assert len(gm.graph_plan.merged) == 1 and _error(m, gm, x) <= 1e-12
