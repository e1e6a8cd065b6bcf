"""Issue 26: precise BatchNorm statistics (train, contract, compare), evaluate reading a run's split, a
contraction check that knows the model's rounding floor, and the usage errors left open."""

import json

import pytest
import torch
from helpers import digit_folder
from typer.testing import CliRunner

import expandctl
from expandctl.checkpoint import load_checkpoint, save
from expandctl.cli import app
from expandctl.models import SmallNet
from expandctl.train import TrainConfig, batchnorm_layers, precise_batchnorm, train

runner = CliRunner()
KW = {"kernel_size": 3, "in_channels": 1, "image_size": 8, "channels": [8, 16, 16], "hidden": 32}


def cli(*args: str) -> tuple[int, dict]:
    """``expandctl ARGS --json`` in this process: exit code and its one JSON object."""
    result = runner.invoke(app, [*args, "--json"])
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, (result.stdout, result.stderr)
    return result.exit_code, json.loads(lines[0])


def dbb_src(path) -> str:
    torch.manual_seed(0)
    big = expandctl.expand(SmallNet(**KW), strategy="dbb", seed=0)
    save(big, path, arch="smallnet", arch_kwargs=KW, input_shape=(1, 8, 8))
    return str(path)


@pytest.fixture(scope="module")
def trained_dbb(tmp_path_factory) -> tuple:
    """A SmallNet with DBB branches trained 3 epochs on digits (about 92 % on its validation split)."""
    root = tmp_path_factory.mktemp("dbb")
    summary = train(TrainConfig(src=dbb_src(root / "dbb.pt"), data="digits", epochs=3, out=str(root / "run"),
                                batch_size=64, lr=0.05, device="cpu"))  # fmt: skip
    return root, summary


# --------------------------------------------------------------------------------------------------
# Precise BatchNorm statistics
# --------------------------------------------------------------------------------------------------
def test_precise_batchnorm_is_the_plain_average_over_the_batches_and_includes_branch_norms():
    torch.manual_seed(0)
    model = expandctl.expand(SmallNet(**KW), strategy="dbb", seed=0)
    norms = {p: m for p, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    branch = [p for p in norms if ".branches." in p]
    assert batchnorm_layers(model) == list(norms) and len(branch) == 18  # 6 per DBB layer, and 3 plain
    seen = {p: [] for p in norms}

    def keep(path):
        def hook(module, args):
            x = args[0].double()
            dims = [0, *range(2, x.dim())]
            seen[path].append((x.mean(dims), x.var(dims, unbiased=True)))

        return hook

    handles = [m.register_forward_pre_hook(keep(p)) for p, m in norms.items()]
    batches = [torch.randn(16, 1, 8, 8) * (1 + i) for i in range(7)]
    done = precise_batchnorm(model, [(x, None) for x in batches], 5)
    for h in handles:
        h.remove()
    assert done == {"layers": len(norms), "batches": 5, "images": 80}
    assert model.training  # its mode is restored
    for p, m in norms.items():
        assert len(seen[p]) == 5 and int(m.num_batches_tracked) == 5 and m.momentum == 0.1  # momentum restored
        mean = torch.stack([s[0] for s in seen[p]]).mean(0)
        var = torch.stack([s[1] for s in seen[p]]).mean(0)
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_train_precise_bn_recomputes_the_statistics_after_the_last_epoch(trained_dbb, tmp_path):
    root, plain = trained_dbb
    code, out = cli("train", str(root / "dbb.pt"), "--data", "digits", "--epochs", "3", "--out", str(tmp_path / "p"),
                    "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--precise-bn", "4")  # fmt: skip
    assert code == 0, out
    last = out["history"][-1]
    assert last["precise_bn_batches"] == 4 and last["precise_bn_layers"] == 21
    assert "precise_bn_batches" not in out["history"][0]  # after the last epoch only
    a, b = load_checkpoint(root / "run" / "last.pt").model, load_checkpoint(tmp_path / "p" / "last.pt").model
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert int(y) == 4  # the cumulative average over the 4 batches, not the training's count
        elif name.endswith(("running_mean", "running_var")):
            assert not torch.equal(x, y), name
        else:
            assert torch.equal(x, y), name  # the same trajectory: only the statistics differ
    # the final epoch's validation and best.pt see the recomputed statistics
    assert load_checkpoint(tmp_path / "p" / "last.pt").extra["train"]["config"]["precise_bn"] == 4


def test_contract_precise_bn_repairs_stale_statistics(trained_dbb, tmp_path):
    """The issue's "done when": a trained dbb checkpoint whose BatchNorm statistics were made stale by
    hand scores near its trained accuracy after contract --precise-bn 20 --data digits, far below without."""
    root, summary = trained_dbb
    trained_acc = summary["final"]["val_acc"]
    assert trained_acc > 0.8
    ckpt = load_checkpoint(root / "run" / "last.pt")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in ckpt.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.mul_(20 * torch.rand(m.running_var.shape, generator=g) + 0.05)
    stale = tmp_path / "stale.pt"
    save(ckpt.model, stale, arch=ckpt.arch, arch_kwargs=ckpt.arch_kwargs, input_shape=ckpt.input_shape,
         extra=ckpt.extra)  # fmt: skip

    fixed_pt = str(tmp_path / "fixed.pt")
    code, fixed = cli("contract", str(stale), "-o", fixed_pt, "--precise-bn", "20", "--data", "digits")
    assert code == 0, fixed
    assert fixed["precise_bn"] == {"layers": 21, "batches": 20, "images": 1280, "data": "digits", "batch_size": 64}
    code, plain = cli("contract", str(stale), "-o", str(tmp_path / "plain.pt"))
    assert code == 0 and plain["precise_bn"] is None
    acc = {name: cli("evaluate", str(tmp_path / f"{name}.pt"), "--data", "digits")[1]["accuracy"]
           for name in ("fixed", "plain")}  # fmt: skip
    assert abs(acc["fixed"] - trained_acc) < 0.03 and acc["plain"] < trained_acc - 0.4, acc

    code, err = cli("contract", str(stale), "-o", str(tmp_path / "x.pt"), "--precise-bn", "20")
    assert code == 2 and "--data" in err["error"] and not (tmp_path / "x.pt").exists()


def test_compare_precise_bn_applies_to_every_run_and_old_folders_keep_their_recipe(tmp_path):
    tiny = {"in_channels": 1, "image_size": 8, "kernel_size": 3, "channels": [4, 8, 8], "hidden": 16}
    src = tmp_path / "tiny.pt"
    save(SmallNet(**tiny), src, arch="smallnet", arch_kwargs=tiny, input_shape=(1, 8, 8))
    recipe = ["--data", "synthetic:1x8x8", "--strategies", "compact,rep", "--seeds", "1", "--epochs", "1",
              "--batch-size", "32"]  # fmt: skip
    code, out = cli("compare", str(src), *recipe, "--out", str(tmp_path / "p"), "--precise-bn", "2")
    assert code == 0, out
    for name in ("compact-s0", "rep-s0"):
        run = json.loads((tmp_path / "p" / "runs" / f"{name}.json").read_text())
        assert run["history"][-1]["precise_bn_batches"] == 2
    assert json.loads((tmp_path / "p" / "settings.json").read_text())["train"]["precise_bn"] == 2
    # without the option the recipe has no such key: a folder written before the option still matches
    code, out = cli("compare", str(src), *recipe, "--out", str(tmp_path / "q"), "--report-only")
    assert code == 2  # no study there yet
    code, out = cli("compare", str(src), *recipe, "--out", str(tmp_path / "p"))
    assert code == 2 and "precise_bn" in out["error"]  # another recipe than the folder's

    # a damaged run file (truncated JSON) is named, set aside and redone; nothing of the other runs is touched
    study = tmp_path / "p"
    damaged = study / "runs" / "rep-s0.json"
    text = damaged.read_text()
    damaged.write_text(text[: len(text) // 2])
    others = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in study.rglob("*")
              if p.is_file() and "rep-s0" not in str(p) and "report" not in p.name and p.suffix != ".png"
              and "locks" not in p.parts and p.name != "study.json"}  # fmt: skip
    assert study / "runs" / "compact-s0.json" in others
    result = runner.invoke(app, ["compare", str(src), *recipe, "--out", str(study), "--precise-bn", "2"])
    assert result.exit_code == 0, result.stderr
    assert "runs/rep-s0.json is damaged (it is not valid JSON" in " ".join(result.stderr.split())
    code, out = cli("compare", str(src), *recipe, "--out", str(study), "--precise-bn", "2")
    assert code == 0 and out["damaged"] == [] and out["reused"] == ["compact-s0", "rep-s0"]
    assert (study / "runs" / "rep-s0.json.damaged").read_text() == text[: len(text) // 2]
    assert json.loads(damaged.read_text())["seed"] == 0  # redone
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in others} == others


# --------------------------------------------------------------------------------------------------
# A contraction check that knows the model's own rounding floor
# --------------------------------------------------------------------------------------------------
def dbb_fc(path, ill: bool = True) -> torch.nn.Module:
    """A float64 SmallNet with DBB branches and FC chains, non-zero biases and random BatchNorm
    statistics. ``ill``: its first block cancels: its branch BatchNorms add 1e8 that the next
    BatchNorm's running mean takes away, so an O(1) activation is the difference of two numbers near
    1e8 and float64 rounding alone moves the output ~1e-8 (relative), 10,000x the fixed rtol. Its
    contraction is exact algebra, rounded differently."""
    from helpers import randomize_batchnorm

    torch.manual_seed(0)
    model = SmallNet(**KW)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.bias.normal_()  # non-zero biases: dropping one must show
    big = randomize_batchnorm(expandctl.expand(model, strategy="dbb+fc", seed=0), seed=1).double().eval()
    if ill:
        with torch.no_grad():
            for p, m in big.named_modules():
                if p.startswith("features.0.branches") and p.endswith(".norm"):
                    m.bias.fill_(2.5e7)
            big.features[1].running_mean.fill_(1e8)
    save(big, path, arch="smallnet", arch_kwargs=KW, input_shape=(1, 8, 8))
    return big


def test_an_exact_contraction_of_an_ill_conditioned_model_passes_within_its_floor(tmp_path):
    from expandctl.verify import DEFAULT_TOLERANCES, FLOOR_MULTIPLE

    dbb_fc(tmp_path / "ill.pt")
    code, out = cli("contract", str(tmp_path / "ill.pt"), "-o", str(tmp_path / "small.pt"))
    assert code == 0, out
    f64 = next(c for c in out["checks"] if c["dtype"] == "float64")
    _, rtol = DEFAULT_TOLERANCES[torch.float64]
    assert f64["passed"] and f64["error"] > 100 * rtol  # the fixed tolerance alone refused it
    assert f64["floor"] > 1e-10 and f64["floor_ratio"] == pytest.approx(f64["error"] / f64["floor"])
    assert f64["floor_ratio"] <= FLOOR_MULTIPLE and f64["floor_multiple"] == FLOOR_MULTIPLE
    assert f64["outputs"][0]["within_floor"] and any("rounding floor" in n for n in f64["notes"])
    assert (tmp_path / "small.pt").is_file()
    # explicit tolerances are the user's: kept as given (the floor is still reported)
    code, out = cli("contract", str(tmp_path / "ill.pt"), "-o", str(tmp_path / "strict.pt"), "--atol", "1e-14",
                    "--rtol", "1e-12")  # fmt: skip
    assert code == 1 and not (tmp_path / "strict.pt").exists()
    assert next(c for c in out["checks"] if c["dtype"] == "float64")["floor"] == f64["floor"]


def _drop_bias(small):
    small.classifier[1].bias = None  # an FC chain's merged bias (the convs' move into the next BatchNorm)


def _wrong_padding(small):
    small.features[4].padding = (2, 2)  # the same output shape downstream (8 -> 4 -> 6 -> 3 -> 3 -> 1)


def _kernel_off(small):
    with torch.no_grad():
        small.features[4].weight.mul_(1 + 1e-3)


@pytest.mark.parametrize("corrupt", [_kernel_off, _wrong_padding, _drop_bias], ids=["kernel", "padding", "bias"])
def test_an_algebra_error_is_refused_however_ill_conditioned_the_model(corrupt, tmp_path, monkeypatch):
    """The floor does not swallow real algebra errors: each injected one is thousands of floors away
    (exit 1, nothing written), on the ill-conditioned model above and on a plain one."""
    import expandctl.rewrite as rewrite
    from expandctl.verify import FLOOR_MULTIPLE

    real = rewrite.contract

    def wrong(model, *args, **kwargs):
        small = real(model, *args, **kwargs)
        corrupt(small)
        return small

    import expandctl.commands.contract as command

    dbb_fc(tmp_path / "ill.pt")
    dbb_fc(tmp_path / "plain.pt", ill=False)
    loaded = {src: load_checkpoint(tmp_path / f"{src}.pt") for src in ("ill", "plain")}  # loading contracts too
    monkeypatch.setattr(rewrite, "contract", wrong)
    for src in ("ill", "plain"):
        monkeypatch.setattr(command, "load_for_cli", lambda *a, src=src: loaded[src])
        code, out = cli("contract", str(tmp_path / f"{src}.pt"), "-o", str(tmp_path / "small.pt"))
        assert code == 1 and out["error_type"] == "CheckFailed" and not (tmp_path / "small.pt").exists(), out
        f64 = next(c for c in out["checks"] if c["dtype"] == "float64")
        assert not f64["passed"] and f64["floor_ratio"] > 100 * FLOOR_MULTIPLE


# --------------------------------------------------------------------------------------------------
# What was left open
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, message",
    [(("--shard", "3/2"), "--shard '3/2' must be I/N with 1 <= I <= N"),
     (("--seeds", "0"), "--seeds must be at least 1"), (("--jobs", "0"), "--jobs must be at least 1")],
)  # fmt: skip
def test_compare_refuses_impossible_counts_as_usage_errors(option, message, tmp_path):
    result = runner.invoke(app, ["compare", "--arch", "smallnet", "--data", "digits", *option, "--out",
                                 str(tmp_path / "s")])  # fmt: skip
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "s").exists()


def test_evaluate_on_a_run_reads_the_val_fraction_it_was_trained_with(tmp_path):
    root = digit_folder(tmp_path / "digits")
    kw = {"kernel_size": 3, "in_channels": 3, "image_size": 16, "num_classes": 3}
    save(SmallNet(**kw), tmp_path / "src.pt", arch="smallnet", arch_kwargs=kw, input_shape=(3, 16, 16))
    code, out = cli("train", str(tmp_path / "src.pt"), "--data", f"imagefolder:{root}", "--val-fraction", "0.5",
                    "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 0, out
    code, scored = cli("evaluate", str(tmp_path / "run" / "last.pt"), "--data", f"imagefolder:{root}")
    assert code == 0 and scored["samples"] == 15  # the run's half, not the default fifth (6 images)
    code, scored = cli("evaluate", str(tmp_path / "run" / "last.pt"), "--data", f"imagefolder:{root}",
                       "--val-fraction", "0.2")  # fmt: skip
    assert code == 0 and scored["samples"] == 6  # an explicit option still wins
