"""Parallel-branch kinds (acb, rep, dbb, orepa): the branch algebra, the layers, contraction, files.

The algebra is checked against a reference written here with torch's own ops (pad, crop, conv,
avg_pool, batch_norm), never the layer code; the layers are checked after real training steps in
train mode (running statistics moved), then in eval mode, in float64.
"""

import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import expandctl
from expandctl import algebra
from expandctl.layers import ACBConv, BranchedConv, DBBConv, OREPAConv, RepConv

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
BRANCH_KINDS = ("acb", "rep", "dbb", "orepa")
TOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    if os.environ.get("EXPANDCTL_RECORD_ERRORS"):  # worst-case reporting: make test-deep
        with open(os.environ["EXPANDCTL_RECORD_ERRORS"], "a") as f:
            f.write(f"{err!r}\n")
    return err


def f_pad(x, pads, mode, fill=None):
    if mode != "zeros":
        return F.pad(x, pads, mode=mode)
    if fill is None:
        return F.pad(x, pads)
    f = fill.reshape(1, -1, *([1] * (x.dim() - 2)))
    return F.pad(x - f, pads) + f


# --------------------------------------------------------------------------------------------------
# The algebra, against a reference built from torch ops
# --------------------------------------------------------------------------------------------------
@st.composite
def branch_case(draw):
    dims = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2, 3]))
    c_in = g * draw(st.integers(1, 2))
    c_out = g * draw(st.integers(1, 2))
    K = tuple(draw(st.integers(1, {1: 7, 2: 5, 3: 3}[dims])) for _ in range(dims))
    small = tuple(draw(st.integers(1, k)) for k in K)
    offset = tuple(draw(st.integers(0, k - s)) for k, s in zip(K, small))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    pads = []
    sizes = []
    for k, d in zip(reversed(K), reversed(dilation)):
        lo, hi = draw(st.integers(0, d * (k - 1))), draw(st.integers(0, d * (k - 1)))
        pads += [lo, hi]
    for j in range(dims):
        lo, hi = pads[2 * (dims - 1 - j)], pads[2 * (dims - 1 - j) + 1]
        need = max(dilation[j] * (K[j] - 1) + 1 - lo - hi, lo + 1, hi + 1, 1)
        sizes.append(draw(st.integers(need, need + {1: 6, 2: 3, 3: 1}[dims])))
    hidden = g * draw(st.integers(1, 3))
    return dict(dims=dims, g=g, c_in=c_in, c_out=c_out, K=K, small=small, offset=offset, stride=stride,
                dilation=dilation, mode=mode, pads=pads, sizes=sizes, hidden=hidden)  # fmt: skip


def crop(x, K, small, offset, dilation):
    for i, (k, s, o, d) in enumerate(zip(K, small, offset, dilation)):
        x = x.narrow(2 + i, o * d, x.shape[2 + i] - (k - s) * d)
    return x


def bn_eval(y, stats):
    mean, var, gamma, beta = stats
    return F.batch_norm(y, mean, var, gamma, beta, training=False, eps=1e-5)


def random_stats(c):
    return (torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5,
            torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64))  # fmt: skip


@given(branch_case())
def test_branch_sum_equals_one_conv_with_the_merged_kernel(case):
    """kxk+BN, a small kernel at an offset +BN, 1x1->BN->kxk->BN (padded with the BN's image of
    zero), 1x1->BN->avg->BN and identity+BN (where it exists), summed: one conv with the merged kernel."""
    dims, g, K, d, s = case["dims"], case["g"], case["K"], case["dilation"], case["stride"]
    m, n, h = case["c_in"], case["c_out"], case["hidden"]
    x = torch.randn(2, m, *case["sizes"], dtype=torch.float64)
    conv = CONV_FN[dims]
    xp = f_pad(x, case["pads"], case["mode"])

    def run(y, w):
        return conv(y, w, None, s, 0, d, g)

    w_main, st_main = torch.randn(n, m // g, *K, dtype=torch.float64), random_stats(n)
    w_small, st_small = torch.randn(n, m // g, *case["small"], dtype=torch.float64), random_stats(n)
    w_pre, st_pre = torch.randn(h, m // g, *([1] * dims), dtype=torch.float64), random_stats(h)
    w_k, st_k = torch.randn(n, h // g, *K, dtype=torch.float64), random_stats(n)
    w_pre2, st_pre2 = torch.randn(n, m // g, *([1] * dims), dtype=torch.float64), random_stats(n)
    st_avg, st_id = random_stats(n), random_stats(n)

    # Reference: the branches run on the activations.
    ref = bn_eval(run(xp, w_main), st_main)
    ref = ref + bn_eval(run(crop(xp, K, case["small"], case["offset"], d), w_small), st_small)
    z = bn_eval(conv(x, w_pre, None, 1, 0, 1, g), st_pre)
    fill = algebra.bn_affine(st_pre[0], st_pre[1], 1e-5, st_pre[2], st_pre[3])[1]
    ref = ref + bn_eval(run(f_pad(z, case["pads"], case["mode"], fill), w_k), st_k)
    z2 = bn_eval(conv(x, w_pre2, None, 1, 0, 1, g), st_pre2)
    fill2 = algebra.bn_affine(st_pre2[0], st_pre2[1], 1e-5, st_pre2[2], st_pre2[3])[1]
    z2p = f_pad(z2, case["pads"], case["mode"], fill2)
    pooled = AVG[dims](z2p, K, s) if max(d) == 1 else run(z2p, algebra.average_kernel(n, g, K, z2p))
    ref = ref + bn_eval(pooled, st_avg)
    tap = algebra.identity_tap(K, d, case["pads"], s)
    if tap is not None and m == n:
        ref = ref + bn_eval(crop(xp, K, (1,) * dims, tap, d), st_id)

    # Merged: the pure functions of algebra.branch.
    def affine(w, b, stats):
        return algebra.apply_affine(w, b, *algebra.bn_affine(stats[0], stats[1], 1e-5, stats[2], stats[3]))

    parts = [affine(w_main, None, st_main)]
    parts.append(affine(algebra.embed_kernel(w_small, K, case["offset"]), None, st_small))
    pre = affine(w_pre, None, st_pre)
    w, b = algebra.compose_chain([pre[0], w_k], [pre[1], None], g)
    parts.append(affine(w, b, st_k))
    pre2 = affine(w_pre2, None, st_pre2)
    w, b = algebra.compose_chain([pre2[0], algebra.average_kernel(n, g, K, x)], [pre2[1], None], g)
    parts.append(affine(w, b, st_avg))
    if tap is not None and m == n:
        parts.append(affine(algebra.identity_kernel(n, g, K, tap, x), None, st_id))
    weight, bias = algebra.sum_branches(parts)
    merged = conv(xp, weight, bias, s, 0, d, g)
    assert rel_err(merged, ref) < TOL


def test_average_after_a_pointwise_layer_is_the_composition_with_the_average_kernel():
    for g, dims in ((1, 2), (3, 1), (2, 3)):
        w, bias = torch.randn(6, 12 // g, *([1] * dims), dtype=torch.float64), torch.randn(6, dtype=torch.float64)
        K = (3, 2, 4)[:dims]
        fast = algebra.average_after(w, bias, K)
        ref = algebra.compose_chain([w, algebra.average_kernel(6, g, K, w)], [bias, None], g)
        torch.testing.assert_close(fast[0], ref[0], rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(fast[1], ref[1], rtol=1e-14, atol=1e-15)


def test_identity_tap_exists_only_where_the_layer_keeps_its_input():
    assert algebra.identity_tap((3, 3), (1, 1), [1, 1, 1, 1], (1, 1)) == (1, 1)
    assert algebra.identity_tap((4,), (1,), [1, 2], (1,)) == (1,)  # even kernel, "same" padding
    assert algebra.identity_tap((3, 3), (2, 2), [2, 2, 2, 2], (1, 1)) == (1, 1)
    assert algebra.identity_tap((3, 3), (1, 1), [1, 1, 1, 1], (2, 2)) is None  # stride
    assert algebra.identity_tap((3, 3), (1, 1), [0, 0, 0, 0], (1, 1)) is None  # output shrinks
    assert algebra.identity_tap((3,), (2,), [1, 3], (1,)) is None  # left pad not a multiple of the dilation


def test_embed_and_sum_refuse_shapes_that_do_not_fit():
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="does not fit"):
        algebra.embed_kernel(w, (3, 3), (1, 0))
    with pytest.raises(ValueError, match="differ in shape"):
        algebra.sum_branches([(w, None), (torch.randn(2, 2, 1, 1), None)])
    assert algebra.centre_offset((1, 3), (5, 3)) == (2, 0)
    assert algebra.centre_offset((1,), (4,)) == (1,)


# --------------------------------------------------------------------------------------------------
# The layers: every kind, any conv, after training steps
# --------------------------------------------------------------------------------------------------
@st.composite
def layer_case(draw):
    dims = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(BRANCH_KINDS))
    groups_kind = draw(st.sampled_from(["1", "g", "dw"]))
    g = 1 if groups_kind == "1" else draw(st.integers(2, 3))
    c_in = g * (1 if groups_kind == "dw" else draw(st.integers(1, 2)))
    c_out = c_in if draw(st.booleans()) else g * draw(st.integers(1, 2))
    K = tuple(draw(st.integers(1, {1: 6, 2: 5, 3: 3}[dims])) for _ in range(dims))
    stride = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    pad_kind = draw(st.sampled_from(["int", "same", "valid"] if max(stride) == 1 else ["int", "valid"]))
    if pad_kind == "int":
        padding = tuple(draw(st.integers(0, (dd * (k - 1) + 1) // 2)) for k, dd in zip(K, dilation))
    else:
        padding = pad_kind
    sizes = []
    for j, (k, dd) in enumerate(zip(K, dilation)):
        pad = padding[j] if isinstance(padding, tuple) else (dd * (k - 1) if padding == "same" else 0)
        sizes.append(max(dd * (k - 1) + 1, pad + 1) + draw(st.integers(0, {1: 5, 2: 3, 3: 1}[dims])))
    return dict(dims=dims, kind=kind, g=g, c_in=c_in, c_out=c_out, K=K, stride=stride, dilation=dilation,
                mode=mode, padding=padding, sizes=sizes, bias=draw(st.booleans()),
                rate=draw(st.sampled_from([None, 1, 2])))  # fmt: skip


def train_steps(model, shape, steps=2, lr=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(3, *shape, generator=gen, dtype=next(model.parameters()).dtype)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@given(layer_case())
def test_every_branch_kind_contracts_exactly_after_training(case):
    conv = CONV[case["dims"]](
        case["c_in"], case["c_out"], case["K"], stride=case["stride"], padding=case["padding"],
        dilation=case["dilation"], groups=case["g"], bias=case["bias"], padding_mode=case["mode"],
    ).double()  # fmt: skip
    cls = expandctl.layers.expansion_for(case["kind"], conv)
    reason = cls.accepts(conv, pointwise=True)
    if reason is not None:  # refused with a sentence, never silently
        assert isinstance(reason, str) and len(reason) > 10
        return
    model = nn.Sequential(conv)
    big = expandctl.expand(model, strategy=case["kind"], rate=case["rate"], pointwise=True)
    shape = (case["c_in"], *case["sizes"])
    train_steps(big, shape)
    layer = big[0]
    norms = [m for m in layer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(int(m.num_batches_tracked) == 2 for m in norms)  # batch statistics were used
    small = expandctl.contract(big)
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        expandctl.set_forward(big, "explicit")
        branches = big(x)
        expandctl.set_forward(big, "fused")
        fused = big(x)
        contracted = small(x)
    assert type(small[0]) is type(conv)
    assert rel_err(contracted, branches) < TOL
    assert rel_err(fused, branches) < TOL


@pytest.mark.parametrize("kind", BRANCH_KINDS)
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode="reflect"),
        nn.Conv3d(2, 2, 3, padding=1),
    ],
)
def test_preserve_starts_at_the_same_function_in_eval_mode(kind, conv):
    conv = conv.double()
    big = expandctl.expand(nn.Sequential(conv), strategy=kind, init="preserve").eval()
    x = torch.randn(2, conv.in_channels, *([7] * (conv.weight.dim() - 2)), dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(big(x), conv(x)) < 1e-12
        expandctl.set_forward(big, "explicit")
        assert rel_err(big(x), conv(x)) < 1e-12


@pytest.mark.parametrize(
    ("kind", "conv", "reason"),
    [
        ("acb", nn.Conv1d(4, 4, 3), "at least two dimensions"),
        ("acb", nn.Conv2d(4, 4, (1, 5)), "at least two dimensions"),
        ("rep", nn.Conv2d(4, 4, 1), "--pointwise"),
        ("dbb", nn.Conv2d(4, 4, 1), "1x1 convolution"),
        ("orepa", nn.Conv2d(4, 4, 1), "1x1 convolution"),
    ],
)
def test_layers_without_such_branches_are_refused_in_the_plan(kind, conv, reason):
    entry = expandctl.plan(nn.Sequential(conv), strategy=kind).entries[0]
    assert entry.kind is None and reason in entry.reason


def test_rep_on_a_1x1_needs_an_identity():
    entry = expandctl.plan(nn.Sequential(nn.Conv2d(4, 6, 1)), strategy="rep", pointwise=True).entries[0]
    assert entry.kind is None and "without an identity" in entry.reason
    entry = expandctl.plan(nn.Sequential(nn.Conv2d(4, 4, 1)), strategy="rep", pointwise=True).entries[0]
    assert entry.kind == "rep" and entry.factors == ["1x1 +BN", "identity +BN"]


def test_a_subclass_with_its_own_forward_is_refused():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, self.weight * 2, self.bias)

    entry = expandctl.plan(nn.Sequential(Scaled(3, 4, 3)), strategy="dbb").entries[0]
    assert entry.kind is None and "plain Conv1d/2d/3d" in entry.reason


@pytest.mark.parametrize("kind", BRANCH_KINDS)
def test_plan_counts_the_parameters_that_are_built(kind):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Conv2d(8, 16, 5, stride=2, padding=2, groups=2, bias=False))  # fmt: skip
    p = expandctl.plan(model, strategy=kind)
    big = expandctl.expand(model, strategy=kind)
    for entry in p.expanded:
        layer = big.get_submodule(entry.path)
        assert isinstance(layer, BranchedConv)
        assert entry.params_after == sum(t.numel() for t in layer.parameters()), entry.path
        assert len(entry.factors) == len(layer.specs) + (1 if kind == "orepa" else 0)


def test_dbb_rate_sets_the_hidden_width_and_defaults_to_the_input_width():
    conv = nn.Conv2d(6, 12, 3, padding=1, groups=3)
    assert DBBConv.hidden_for(conv, None) == [6]
    assert expandctl.plan(nn.Sequential(conv), strategy="dbb").entries[0].hidden == [6]
    assert expandctl.plan(nn.Sequential(conv), strategy="dbb", rate=2).entries[0].hidden == [12]
    layer = expandctl.expand(nn.Sequential(conv), strategy="orepa", rate=2)[0]
    assert layer.branches["pw_kxk"].pre.out_channels == 12
    assert RepConv.hidden_for(conv, 4) == [] and ACBConv.hidden_for(conv, 4) == []


def test_orepa_trains_one_composed_conv_with_the_gradients_of_its_branches():
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect").double()
    big = expandctl.expand(nn.Sequential(conv), strategy="orepa", seed=0).train()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    probe = torch.randn(3, 6, 8, 8, dtype=torch.float64)
    results = {}
    for mode in ("fused", "explicit"):
        model = copy.deepcopy(big)
        expandctl.set_forward(model, mode)
        out = model(x)
        (out * probe).sum().backward()
        results[mode] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert rel_err(results["fused"][0], results["explicit"][0]) < 1e-12
    for name, grad in results["fused"][1].items():
        torch.testing.assert_close(grad, results["explicit"][1][name], rtol=1e-9, atol=1e-12, msg=name)
    assert OREPAConv.trains_on_equivalent is False and big[0].bn.training


def test_bn_branches_train_with_batch_statistics_and_fuse_in_eval(monkeypatch):
    big = expandctl.expand(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), strategy="rep")
    layer = big[0]
    calls = []
    original = BranchedConv._explicit
    monkeypatch.setattr(BranchedConv, "_explicit", lambda self, x: calls.append(1) or original(self, x))
    big.train()(torch.randn(2, 3, 6, 6))
    assert calls and int(layer.branches["main"].norm.num_batches_tracked) == 1
    calls.clear()
    with torch.no_grad():
        big.eval()(torch.randn(2, 3, 6, 6))
    assert not calls  # eval mode runs the merged kernel


# --------------------------------------------------------------------------------------------------
# Contraction leaves the compact model's structure; files round-trip
# --------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)  # no BatchNorm after it
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("kind", BRANCH_KINDS)
def test_contraction_moves_the_shift_into_the_following_batchnorm(kind):
    compact = Block().double()
    big = train_steps(expandctl.expand(compact, strategy=kind, seed=0), (3, 8, 8))
    small = expandctl.contract(big)
    assert small.conv1.bias is None  # the shift went into bn1's running mean
    assert small.conv2.bias is not None  # nothing to absorb it: the conv keeps it
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expandctl.set_forward(big, "explicit")
        assert rel_err(small(x), big(x)) < TOL


def build_block():
    return Block()


@pytest.mark.parametrize("kind", BRANCH_KINDS)
def test_branch_checkpoints_round_trip_expanded_and_contracted(kind, tmp_path):
    big = train_steps(expandctl.expand(Block(), strategy=kind, seed=0).float(), (3, 8, 8))
    arch = f"{__name__}:build_block"
    expandctl.save(big, tmp_path / "big.pt", arch=arch, input_shape=(3, 8, 8))
    loaded = expandctl.load(tmp_path / "big.pt")
    assert expandctl.layout(loaded) == expandctl.layout(big)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), big(x), rtol=0, atol=0)
    small = expandctl.contract(big)
    expandctl.save(small, tmp_path / "small.safetensors", arch=arch, input_shape=(3, 8, 8))
    ckpt = expandctl.load_checkpoint(tmp_path / "small.safetensors")
    assert ckpt.added_bias == ["conv2"]
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model.eval()(x), small(x), rtol=0, atol=0)


def test_branch_kinds_are_in_the_registry_and_the_help():
    from expandctl.commands.expand import STRATEGY_HELP

    for kind in BRANCH_KINDS:
        assert kind in expandctl.EXPANSIONS and f"{kind}:" in STRATEGY_HELP
    assert math.isclose(DBBConv.default_rate, 1.0) and RepConv.default_rate is None


# --------------------------------------------------------------------------------------------------
# The command line: expand -> train -> train --resume -> contract -> verify -> export
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BRANCH_KINDS)
def test_cli_pipeline_with_a_branch_strategy(kind, tmp_path):
    import json

    import onnx
    from typer.testing import CliRunner

    from expandctl.cli import app
    from expandctl.models import SmallNet

    tiny = {"in_channels": 1, "image_size": 8, "kernel_size": 5, "channels": [4, 8], "hidden": 16}
    torch.manual_seed(0)
    torch.save(SmallNet(**tiny).state_dict(), tmp_path / "sn.pt")
    runner = CliRunner()

    def cli(*args):
        r = runner.invoke(app, [str(a) for a in args] + ["--json"])
        assert r.exit_code == 0, (args, r.stdout, r.stderr)
        return json.loads(r.stdout)

    arch = ["--arch", "smallnet", "--arch-kwargs", json.dumps(tiny)]
    out = cli("expand", tmp_path / "sn.pt", *arch, "--strategy", kind, "--seed", "0", "-o", tmp_path / "x.pt")
    assert out["strategy"] == kind and out["rate"] is None and len(out["expanded_layers"]) == 2
    trained = cli("train", tmp_path / "x.pt", "--data", "synthetic", "--epochs", "1", "--batch-size", "64",
                  "--lr", "0.05", "--out", tmp_path / "run")  # fmt: skip
    assert [h["epoch"] for h in trained["history"]] == [1]
    cli("contract", tmp_path / "run" / "last.pt", "-o", tmp_path / "small.pt")
    report = cli("verify", tmp_path / "run" / "last.pt", tmp_path / "small.pt", "--dtype", "float64")
    assert report["ok"] is True
    cli("export", tmp_path / "small.pt", "-o", tmp_path / "small.onnx")
    cli("export", tmp_path / "sn.pt", *arch, "--input-shape", "1,8,8", "-o", tmp_path / "compact.onnx")
    ops = [[n.op_type for n in onnx.load(tmp_path / f).graph.node] for f in ("small.onnx", "compact.onnx")]
    assert ops[0] == ops[1]  # the contracted graph is the compact model's


@pytest.mark.parametrize("kind", ["rep", "orepa"])
def test_resume_of_a_branch_run_is_exact(kind, tmp_path):
    """Interrupted after epoch 1, resumed: the same weights and BatchNorm statistics as one go."""
    from test_train import StopAfter, config, make_src, same_weights, state_of

    from expandctl.train.loop import train

    compact = make_src(tmp_path, expanded=False)
    src = expandctl.save(
        expandctl.expand(expandctl.load(compact), strategy=kind, seed=0), tmp_path / "x.pt",
        arch="smallnet", arch_kwargs=expandctl.load_checkpoint(compact).arch_kwargs, input_shape=(1, 8, 8),
    )  # fmt: skip
    train(config(src, tmp_path / "once", epochs=2))
    with pytest.raises(KeyboardInterrupt):
        train(config(src, tmp_path / "twice", epochs=2), StopAfter(1))
    train(config(src, tmp_path / "twice", epochs=2, resume=True))
    a, b = state_of(tmp_path / "once/last.pt"), state_of(tmp_path / "twice/last.pt")
    assert any(".branches." in k and "running_mean" in k for k in a) or kind == "orepa"
    assert same_weights(a, b)
