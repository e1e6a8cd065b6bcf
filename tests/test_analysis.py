"""expandctl.analysis: gradient confusion, loss landscapes, plots, and their commands (tiny models)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_train import TINY, make_src, metrics, state_of
from typer.testing import CliRunner

import expandctl
from expandctl.analysis import (
    cosine_similarities,
    evaluate,
    filter_normalized_direction,
    gaussian_kde,
    gradient_confusion,
    loss_landscape,
    read_metrics,
    scott_bandwidth,
)
from expandctl.analysis.confusion import batches_for
from expandctl.analysis.landscape import grid
from expandctl.cli import app
from expandctl.data import TensorImages, load_data
from expandctl.errors import UsageError
from expandctl.models import SmallNet
from expandctl.train import EpochContext, TrainConfig, train

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


class Points(torch.utils.data.Dataset):
    """A plain (per-item) dataset of given inputs, all labelled 0."""

    def __init__(self, xs):
        self.xs = [torch.as_tensor(x, dtype=torch.float64) for x in xs]

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, i):
        return self.xs[i], 0


def _linear(d: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 1, bias=False)).double()


def _output_sum(out, y):
    return out.sum()  # d loss / d w = sum of the batch's inputs: gradients we can predict


@pytest.fixture(scope="module")
def data():
    return load_data("synthetic", (1, 8, 8))


@pytest.fixture(scope="module")
def expanded():
    torch.manual_seed(0)
    return expandctl.expand(SmallNet(**TINY), "ck+fc", rate=2, seed=0)


# --- gradient confusion ----------------------------------------------------------------------------
@pytest.mark.parametrize("pairs, n", [(1, 2), (3, 3), (4, 4), (6, 4), (7, 5), (100, 15)])
def test_batches_for_is_the_fewest_that_give_the_pairs(pairs, n):
    assert batches_for(pairs) == n and n * (n - 1) // 2 >= pairs > (n - 1) * (n - 2) // 2


def test_cosine_similarities_known_vectors():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [2.0, 2.0], [0.0, 0.0]])
    pairs = torch.tensor([[0, 1], [0, 2], [0, 3], [3, 3], [0, 4]])
    sims = cosine_similarities(g, pairs)
    assert sims.dtype == torch.float64
    torch.testing.assert_close(sims, torch.tensor([0.0, -1.0, 0.5**0.5, 1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_identical_batches_have_cosine_one(mode):
    torch.manual_seed(1)
    image = torch.randn(1, 1, 8, 8)
    same = TensorImages(image.repeat(64, 1, 1, 1), torch.full((64,), 3))
    r = gradient_confusion(SmallNet(**TINY), same, pairs=6, batch_size=8, mode=mode)
    assert r["pairs"] == 6 == len(r["similarities"]) and r["batches"] == 4
    assert r["min"] == pytest.approx(1.0, abs=1e-6) and r["mean"] == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_gradients_give_zero_and_opposite_give_minus_one():
    # A linear model with loss = sum of outputs: the gradient of a one-image batch is the image.
    basis = Points(torch.eye(4).reshape(4, 1, 2, 2))
    r = gradient_confusion(_linear(4), basis, pairs=6, batch_size=1, loss_fn=_output_sum)
    assert r["similarities"] == [0.0] * 6 and r["min"] == r["mean"] == 0.0

    opposite = Points(torch.tensor([[1.0, 2.0, 0.0, 0.0], [-1.0, -2.0, 0.0, 0.0]]).reshape(2, 1, 2, 2))
    r = gradient_confusion(_linear(4), opposite, pairs=1, batch_size=1, loss_fn=_output_sum)
    assert r["similarities"] == [pytest.approx(-1.0, abs=1e-12)]


def test_confusion_on_a_real_model_leaves_it_untouched(data, expanded):
    before = {k: v.clone() for k, v in expanded.state_dict().items()}
    rng = torch.get_rng_state()
    expanded.train()
    expanded.features[1].eval()  # a mixed-mode model keeps its per-module modes
    r = gradient_confusion(expanded, data.train, pairs=10, batch_size=32, seed=3)
    assert -1 <= r["min"] <= r["mean"] <= 1 and len(r["similarities"]) == 10
    assert r["min"] == min(r["similarities"]) and r["mean"] == pytest.approx(np.mean(r["similarities"]))
    assert r["params"] == sum(p.numel() for p in expanded.parameters())
    for k, v in expanded.state_dict().items():  # BatchNorm statistics restored, weights untouched
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in expanded.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert expanded.training and not expanded.features[1].training
    again = gradient_confusion(expanded, data.train, pairs=10, batch_size=32, seed=3)
    assert again["similarities"] == r["similarities"]  # seeded: reproducible
    expanded.eval()


def test_wrt_compact_measures_the_contracted_parameters(data, expanded):
    compact = expandctl.contract(expanded)
    r = gradient_confusion(expanded, data.train, pairs=3, batch_size=32, wrt="compact")
    ref = gradient_confusion(compact, data.train, pairs=3, batch_size=32, wrt="trained")
    assert r["params"] == sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in expanded.parameters())
    np.testing.assert_allclose(r["similarities"], ref["similarities"], atol=1e-5)
    trained = gradient_confusion(expanded, data.train, pairs=3, batch_size=32, wrt="trained")
    assert trained["similarities"] != r["similarities"]  # factors are a different parameter space


@pytest.mark.parametrize(
    "kw, message",
    [({"pairs": 0}, "pairs"), ({"batch_size": 10_000}, "larger than"), ({"wrt": "x"}, "wrt"), ({"mode": "x"}, "mode")],
)
def test_confusion_rejects_bad_arguments(data, kw, message):
    with pytest.raises(UsageError, match=message):
        gradient_confusion(SmallNet(**TINY), data.train, **{"pairs": 2, "batch_size": 8, **kw})


# --- loss landscape --------------------------------------------------------------------------------
def test_grid_is_symmetric_with_an_exact_zero():
    g = grid(21, 1.0)
    assert len(g) == 21 and g[0] == -1.0 and g[-1] == 1.0 and g[10] == 0.0
    assert grid(1, 5.0) == [0.0] and grid(4, 1.0)[0] == -1.0


def test_filter_normalisation_matches_each_filter_norm(expanded):
    compact = expandctl.contract(expanded)
    params = list(compact.parameters())
    d1 = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    d2 = filter_normalized_direction(params, torch.Generator().manual_seed(1))
    seen_conv = seen_linear = False
    for p, d, other in zip(params, d1, d2):
        assert d.shape == p.shape and d.dtype == p.dtype
        if p.dim() <= 1:
            assert torch.count_nonzero(d) == 0  # biases and BatchNorm: no direction
            continue
        seen_conv |= p.dim() == 4
        seen_linear |= p.dim() == 2
        torch.testing.assert_close(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)
        assert not torch.allclose(d, other)  # random, not the weights themselves
    assert seen_conv and seen_linear


def _plain_loss(model, dataset) -> float:
    model.eval()
    x, y = dataset[list(range(len(dataset)))]
    with torch.no_grad():
        return F.cross_entropy(model(x).double(), y).item()


def test_landscape_at_zero_is_the_evaluation_loss(data, expanded):
    compact = expandctl.contract(expanded)
    before = {k: v.clone() for k, v in expanded.state_dict().items()}
    r = loss_landscape(expanded, data.val, dims=1, steps=5, span=0.5, batch_size=50)
    plain = _plain_loss(compact, data.val)
    assert r["loss_at_0"] == pytest.approx(plain, abs=1e-6)
    assert r["loss_at_0"] == pytest.approx(_plain_loss(expanded, data.val), abs=1e-5)  # the expanded function
    assert r["loss"][2] == r["loss_at_0"] and r["error"][2] == r["error_at_0"]  # alpha = 0 is on the grid
    assert r["alphas"] == [-0.5, -0.25, 0.0, 0.25, 0.5] and r["samples"] == len(data.val)
    assert len(set(r["loss"])) == 5  # the other points moved
    assert all(torch.equal(v, before[k]) for k, v in expanded.state_dict().items())  # worked on a copy

    ev = evaluate(compact, data.val, batch_size=50, max_batches=2)
    part = loss_landscape(compact, data.val, steps=1, batch_size=50, max_batches=2)
    assert ev["samples"] == part["samples"] == 100 and part["loss_at_0"] == ev["loss"]

    factors = loss_landscape(expanded, data.val, steps=3, space="factors")
    assert factors["loss_at_0"] == pytest.approx(plain, abs=1e-5) and factors["loss"][1] == factors["loss_at_0"]


def test_2d_landscape_shape_and_centre(data, expanded):
    r = loss_landscape(expanded, data.val, dims=2, steps=3, span=1.0, max_batches=1, batch_size=64)
    assert r["alphas"] == r["betas"] == [-1.0, 0.0, 1.0]
    assert len(r["loss"]) == 3 and all(len(row) == 3 for row in r["loss"])
    assert r["loss"][1][1] == r["loss_at_0"] and r["error"][1][1] == r["error_at_0"]
    assert r["loss"][0][1] != r["loss"][1][0]  # two different directions


def test_trained_convex_model_sits_at_the_bottom_of_its_landscape():
    # Softmax regression on noisy labels: strictly convex, one minimum; L-BFGS finds it.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (96,), generator=g)
    ds = TensorImages(x, y)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    r = loss_landscape(model, ds, dims=1, steps=11, span=1.0, seed=0)
    losses = r["loss"]
    assert int(np.argmin(losses)) == 5 and r["alphas"][5] == 0.0
    assert all(b > a for a, b in zip(losses[5:], losses[6:]))  # rises on both sides
    assert all(a > b for a, b in zip(losses[:5], losses[1:6]))


def test_landscape_rejects_bad_arguments(data):
    for kw, message in [
        ({"dims": 3}, "dims"),
        ({"steps": 0}, "steps"),
        ({"span": 0}, "span"),
        ({"space": "x"}, "space"),
    ]:
        with pytest.raises(UsageError, match=message):
            loss_landscape(SmallNet(**TINY), data.val, **kw)


# --- plots -----------------------------------------------------------------------------------------
def test_kde_uses_scotts_rule_and_integrates_to_one():
    rng = np.random.default_rng(0)
    s = rng.normal(0.2, 0.1, 200)
    assert scott_bandwidth(s) == pytest.approx(s.std(ddof=1) * 200 ** (-0.2))
    xs = np.linspace(-1, 1.5, 5001)
    dens = gaussian_kde(s, xs)
    assert np.trapezoid(dens, xs) == pytest.approx(1.0, abs=1e-4)
    assert xs[np.argmax(dens)] == pytest.approx(0.2, abs=0.05)
    assert scott_bandwidth([0.5, 0.5, 0.5]) > 0  # no spread: still a density
    scipy_stats = pytest.importorskip("scipy.stats")
    np.testing.assert_allclose(dens, scipy_stats.gaussian_kde(s)(xs), rtol=1e-10, atol=1e-12)


def _fake_run(folder: Path, losses, confusion=False) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for e, loss in enumerate(losses, start=1):
        row = {"epoch": e, "lr": 0.1, "train_loss": loss, "train_acc": 1 - loss / 3, "val_loss": loss + 0.1,
               "val_acc": 0.9 - loss / 3, "seconds": 0.1, "images_per_s": 100.0}  # fmt: skip
        if confusion:
            row.update(grad_confusion_min=-0.1 * e, grad_confusion_mean=0.2)
        rows.append(json.dumps(row))
    (folder / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_plot_command_overlays_runs(tmp_path):
    a = _fake_run(tmp_path / "compact", [2.0, 1.5, 1.2])
    b = _fake_run(tmp_path / "expanded", [1.8, 1.0, 0.7], confusion=True)
    out = tmp_path / "cmp.png"
    r = runner.invoke(app, ["plot", str(a), str(b), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["ok"] and payload["output"] == str(out) and out.read_bytes().startswith(PNG)
    assert [run["label"] for run in payload["runs"]] == ["compact", "expanded"]
    assert payload["runs"][1]["best_val_acc"] == pytest.approx(0.9 - 0.7 / 3)

    r = runner.invoke(app, ["plot", str(a), str(b), "-o", str(out), "--labels", "only-one"])
    assert r.exit_code == 2 and "--labels gives 1 labels for 2 runs" in r.stderr
    (a / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1}\n{"epoch": 2, "trai')
    r = runner.invoke(app, ["plot", str(a), "-o", str(out)])
    assert r.exit_code == 2 and "metrics.jsonl:2 is not valid JSON" in r.stderr
    assert read_metrics(b)[2]["grad_confusion_min"] == pytest.approx(-0.3)


# --- the analyze commands --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_src(tmp_path_factory.mktemp("analysis"))


def test_grad_confusion_command(src, tmp_path):
    out = tmp_path / "conf.png"
    args = ["analyze", "grad-confusion", str(src), "--data", "synthetic", "--pairs", "5", "--batch-size", "32"]
    r = runner.invoke(app, [*args, "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["ok"] and p["command"] == "analyze grad-confusion" and p["pairs"] == 5 == len(p["similarities"])
    assert -1 <= p["min"] <= p["mean"] <= 1 and out.read_bytes().startswith(PNG)
    lib = gradient_confusion(expandctl.load(src), load_data("synthetic", (1, 8, 8)).train, pairs=5, batch_size=32)
    assert p["similarities"] == pytest.approx(lib["similarities"], abs=1e-6)

    r = runner.invoke(app, [*args, "-o", str(tmp_path)])  # a folder: the default name inside it
    assert r.exit_code == 0, r.output
    assert "min" in r.stdout and (tmp_path / "src.grad-confusion.png").is_file()
    r = runner.invoke(app, [*args, "--split", "test"])
    assert r.exit_code == 2 and "--split must be train or val" in r.stderr
    r = runner.invoke(app, [*args, "--data", "synthetic:3x8x8"])
    assert r.exit_code == 2 and "takes 1x8x8 inputs but --data synthetic:3x8x8 gives 3x8x8 images" in r.stderr


def test_landscape_command(src, tmp_path):
    out = tmp_path / "land.png"
    args = ["analyze", "landscape", str(src), "--data", "synthetic", "--split", "val", "--steps", "5"]
    r = runner.invoke(app, [*args, "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["ok"] and p["dims"] == 1 and len(p["alphas"]) == len(p["loss"]) == 5 and out.read_bytes().startswith(PNG)
    val = load_data("synthetic", (1, 8, 8)).val
    assert p["loss_at_0"] == pytest.approx(evaluate(expandctl.load(src), val)["loss"], abs=1e-5)

    r = runner.invoke(app, [*args, "--dims", "2", "--steps", "3", "--max-batches", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "loss at 0" in r.stdout and "wrote" in r.stdout
    r = runner.invoke(app, [*args, "--dims", "3", "--json"])
    assert r.exit_code == 2 and json.loads(r.stdout)["error"] == "--dims must be 1 or 2 (got 3)"
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "land.jpg")])
    assert r.exit_code == 2 and "must end in one of .png" in r.stderr


# --- train --grad-confusion ------------------------------------------------------------------------
def test_train_records_grad_confusion_without_changing_the_run(src, tmp_path):
    args = ["train", str(src), "--data", "synthetic", "--epochs", "2", "--batch-size", "64", "--lr", "0.1", "--quiet"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "with"), "--grad-confusion", "--grad-confusion-pairs", "3"])
    assert r.exit_code == 0, r.output
    rows = metrics(tmp_path / "with")
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        assert -1 <= row["grad_confusion_min"] <= row["grad_confusion_mean"] <= 1
    train(TrainConfig(src=str(src), out=str(tmp_path / "without"), data="synthetic", epochs=2, batch_size=64, lr=0.1))
    assert "grad_confusion_min" not in metrics(tmp_path / "without")[0]
    a, b = state_of(tmp_path / "with" / "last.pt"), state_of(tmp_path / "without" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same weights and BatchNorm statistics, bit for bit
    assert [row["train_loss"] for row in rows] == [row["train_loss"] for row in metrics(tmp_path / "without")]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "--grad-confusion-pairs", "0"])
    assert r.exit_code == 2 and "--grad-confusion-pairs must be at least 1" in r.stderr


def test_hook_is_silent_off_rank_zero(data, expanded):
    from expandctl.analysis import grad_confusion_hook

    ctx = EpochContext(1, expanded, data.train, data.val, torch.device("cpu"), {}, F.cross_entropy, None, rank=1)
    assert grad_confusion_hook(pairs=2, batch_size=16)(ctx) is None
    ctx.rank = 0
    got = grad_confusion_hook(pairs=2, batch_size=16)(ctx)
    assert set(got) == {"grad_confusion_min", "grad_confusion_mean"} and not math.isnan(got["grad_confusion_min"])


# --- the library verbs behind analyze and plot (issue 28) ----------------------------------------
def _payload(args: list[str]) -> dict:
    """A command's --json object without the console's envelope (ok, command)."""
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return {k: v for k, v in json.loads(r.stdout).items() if k not in ("ok", "command")}


def test_analysis_verbs_return_the_commands_json_object(src, tmp_path):
    from expandctl.workflows.analyze import GradConfusionOptions, LandscapeOptions, grad_confusion, landscape

    conf, land = str(tmp_path / "conf.png"), str(tmp_path / "land.png")
    cli = _payload(["analyze", "grad-confusion", str(src), "--data", "synthetic", "--pairs", "3", "--batch-size",
                    "16", "-o", conf])  # fmt: skip
    lib = grad_confusion(str(src), GradConfusionOptions(data="synthetic", pairs=3, batch_size=16, output=conf))
    assert json.loads(json.dumps(lib.to_dict())) == cli
    cli = _payload(["analyze", "landscape", str(src), "--data", "synthetic", "--steps", "3", "--max-batches", "1",
                    "--split", "val", "-o", land])  # fmt: skip
    lib = landscape(str(src), LandscapeOptions(data="synthetic", steps=3, max_batches=1, split="val", output=land))
    assert json.loads(json.dumps(lib.to_dict())) == cli


def test_plot_verb_returns_the_commands_json_object(tmp_path):
    from expandctl.workflows.plot import plot_runs

    a = _fake_run(tmp_path / "compact", [2.0, 1.5])
    b = _fake_run(tmp_path / "expanded", [1.8, 1.0], confusion=True)
    out = str(tmp_path / "runs.png")
    cli = _payload(["plot", str(a), str(b), "-o", out, "--labels", "c,e"])
    assert json.loads(json.dumps(plot_runs([str(a), str(b)], out, ["c", "e"]).to_dict())) == cli


@pytest.mark.parametrize(
    "call, option, message, flag_message",
    [
        ({"dims": 3}, "dims", "dims must be 1 or 2 (got 3)", "--dims must be 1 or 2 (got 3)"),
        ({"split": "test"}, "split", "split must be train or val (got 'test')", "--split must be train or val"),
    ],
)
def test_analysis_errors_name_the_parameter_and_the_cli_its_flag(src, tmp_path, call, option, message, flag_message):
    from expandctl.workflows.analyze import LandscapeOptions, landscape

    with pytest.raises(UsageError) as e:
        landscape(str(src), LandscapeOptions(data="synthetic", output=str(tmp_path / "l.png"), **call))
    assert e.value.option == option and str(e.value) == message
    flag = "--" + option
    r = runner.invoke(app, ["analyze", "landscape", str(src), "--data", "synthetic", flag, str(call[option]), "--json"])
    assert r.exit_code == 2 and json.loads(r.stdout)["error"].startswith(flag_message)


@pytest.mark.parametrize(
    "module, command, args",
    [("quantize", "quantize", []), ("compare", "compare", []), ("analyze", "analyze_app", ["grad-confusion"]),
     ("analyze", "analyze_app", ["landscape"]), ("plot", "plot", [])],
)  # fmt: skip
def test_help_of_these_commands_loads_no_torch(module, command, args):
    """The command module alone (as cli.py registers it) answers --help without importing torch."""
    import subprocess
    import sys

    code = f"""
import sys, typer
from typer.testing import CliRunner
from expandctl.commands import {module} as m
from expandctl.commands.runtime import Command
app = typer.Typer()
command = getattr(m, {command!r})
app.add_typer(command, name="c") if isinstance(command, typer.Typer) else app.command("c", cls=Command)(command)
app.command("other")(lambda: None)  # two commands: "c" stays a subcommand
r = CliRunner().invoke(app, ["c", *{args!r}, "--help"])
assert r.exit_code == 0 and "Usage:" in r.output, r.output
assert "torch" not in sys.modules, "torch was imported"
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
