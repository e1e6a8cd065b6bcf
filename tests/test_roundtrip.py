"""Every expansion kind in the registry survives save -> load -> ``train --resume`` -> contract (issue 18.1).

The kinds are read from the registries, so a kind added later is covered without editing this file;
the model (``helpers.AllLayers``) has a Conv1d/2d/3d, a ConvTranspose1d/2d/3d and a Linear.
"""

import json

import pytest
import torch
from helpers import AllLayers, randomize_batchnorm
from test_train import StopAfter
from typer.testing import CliRunner

import expandctl
from expandctl import checkpoint as C
from expandctl.cli import app
from expandctl.data import DataOptions
from expandctl.errors import UsageError
from expandctl.layers import ExpandedLayer, expansion_for, strategy_names
from expandctl.rewrite import expanded_layers
from expandctl.train import TrainConfig, train

runner = CliRunner()
ARCH = "helpers:AllLayers"
SHAPE = (1, 8, 8)
KINDS = strategy_names()  # one registry: every kind, for every layer type it takes


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def close(a, b, tol=1e-5):
    return ((a - b).abs().max() / b.abs().max()).item() < tol


def expected_classes(model, kind):
    """The registry classes of ``kind`` that accept some layer of ``model`` (1x1 kernels included)."""
    found = set()
    for m in model.modules():
        cls = expansion_for(kind, m)
        if cls is not None and cls.accepts(m, pointwise=True) is None:
            found.add(cls)
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_survives_save_load_resume_contract(kind, tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(AllLayers())
    big = expandctl.expand(model, kind, rate=2, pointwise=True, seed=0)
    used = {type(layer) for _, layer in expanded_layers(big)}
    assert used and used == expected_classes(model, kind)  # every class of this kind, transposed ones too

    src = C.save(big, tmp_path / "src.pt", arch=ARCH, input_shape=SHAPE)
    x = torch.randn(4, *SHAPE)
    loaded = C.load(src)
    assert C.load_checkpoint(src).layout == expandctl.layout(big)
    assert torch.equal(outputs(loaded, x), outputs(big, x))

    # Interrupted after epoch 1 (last.pt written by the training loop), resumed through the CLI.
    run = tmp_path / "run"
    base = {"data": "synthetic:1x8x8", "epochs": 2, "batch_size": 32, "lr": 0.01}
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(src=str(src), out=str(run), data_options=DataOptions(train_subset=64), **base), StopAfter(1))
    assert C.load_checkpoint(run / "last.pt").extra["train"]["epoch"] == 1
    args = ["--data", base["data"], "--epochs", 2, "--batch-size", 32, "--train-subset", 64, "--lr", 0.01]
    data = json.loads(cli("train", src, *args, "--out", run, "--resume", "--json").stdout)
    assert data["start_epoch"] == 1 and data["epochs_run"] == 1

    trained = C.load(run / "last.pt")
    assert {type(m) for m in trained.modules() if isinstance(m, ExpandedLayer)} == used
    assert not torch.equal(outputs(trained, x), outputs(loaded, x))  # it did train
    cli("contract", run / "last.pt", "-o", tmp_path / "compact.pt", "-q")
    compact = C.load(tmp_path / "compact.pt")
    assert not any(isinstance(m, ExpandedLayer) for m in compact.modules())
    explicit = expandctl.set_forward(trained, "explicit")
    assert close(outputs(compact, x), outputs(explicit, x))


def test_a_layout_that_does_not_rebuild_the_layers_is_not_blamed_on_arch(tmp_path, monkeypatch):
    """A recorded layout that rebuilds other shapes than the model's is a bug or a stale file, not a
    wrong --arch: the arch rebuilt every other weight, so the message says where it went wrong."""
    big = expandctl.expand(AllLayers(), "ck", rate=2, seed=0)
    layer = dict(expanded_layers(big))["c2"]
    real = type(layer).config
    monkeypatch.setattr(type(layer), "config", lambda self: {**real(self), "hidden": [3]})
    with pytest.raises(RuntimeError) as err:  # the CLI's "internal error ... report it", exit 70
        C.save(big, tmp_path / "bad.pt", arch=ARCH, input_shape=SHAPE)
    message = str(err.value)
    assert "layout" in message and "c2.factors.0.weight" in message and "a bug in expandctl" in message
    assert "pass the right --arch" not in message and not (tmp_path / "bad.pt").exists()


def test_a_file_whose_weights_do_not_fit_its_own_layout_says_so(tmp_path):
    big = expandctl.expand(AllLayers(), "ck", rate=2, seed=0)
    path = C.save(big, tmp_path / "ok.pt", arch=ARCH, input_shape=SHAPE)
    blob = torch.load(path, weights_only=True)
    blob["layout"]["c2"]["hidden"] = [3]  # edited by hand, or written by a buggy version
    torch.save(blob, tmp_path / "stale.pt")
    with pytest.raises(UsageError) as err:
        C.load(tmp_path / "stale.pt")
    message = str(err.value)
    assert "layout its header records" in message and "c2.factors.0.weight" in message
    assert "every other weight fits --arch" in message and "check --arch" not in message


def test_a_wrong_arch_is_still_blamed_on_arch(tmp_path):
    """The arch builds the expanded layer itself with other sizes: that is a wrong --arch-kwargs."""
    big = expandctl.expand(AllLayers(), "fc", rate=2, seed=0)
    with pytest.raises(UsageError, match="pass the right --arch"):
        C.save(big, tmp_path / "x.pt", arch=ARCH, arch_kwargs={"num_classes": 5}, input_shape=SHAPE)
