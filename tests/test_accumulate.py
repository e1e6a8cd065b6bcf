"""Gradient accumulation: ``train --accumulate N`` and :class:`expandctl.layers.ComposeOnce`.

Fused layers compose their kernels once per optimizer step and backpropagate through the
composition once; the result must equal plain accumulation (compose and backpropagate per
mini-batch), which is the same sum of gradients in another order.
"""

import pytest
import torch
import torch.nn as nn
from test_train import config, make_src, same_weights, state_of
from test_train_cli import invoke

import expandctl
from expandctl import algebra
from expandctl.checkpoint import load_checkpoint
from expandctl.errors import UsageError
from expandctl.layers import ComposeOnce
from expandctl.models import SmallNet
from expandctl.train import epoch as epoch_module
from expandctl.train import train


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_src(tmp_path_factory.mktemp("acc"))


def _model():
    torch.manual_seed(0)
    net = SmallNet(in_channels=1, image_size=8, kernel_size=7, channels=(4, 8), hidden=16).double()
    return expandctl.expand(net, "ck+fc", rate=2, seed=0)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_compose_once_gives_the_plain_accumulated_gradients(monkeypatch):
    batches = [(torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))) for _ in range(3)]
    loss_fn = nn.CrossEntropyLoss()
    calls = []
    real = algebra.compose_chain_fast
    monkeypatch.setattr(algebra, "compose_chain_fast", lambda *a, **k: calls.append(1) or real(*a, **k))

    plain = _model()
    for x, y in batches:
        (loss_fn(plain(x), y) / 3).backward()
    plain_calls, calls[:] = len(calls), []

    once_model = _model()
    layers = [layer for _, layer in expandctl.expanded_layers(once_model)]
    with ComposeOnce(layers) as once:
        for x, y in batches:
            (loss_fn(once_model(x), y) / 3).backward()
        assert all(f.weight.grad is None for layer in layers for f in layer.factors)  # not yet
        once.backward()
    assert plain_calls == 3 * len(layers) and len(calls) == len(layers)  # one composition per layer
    expected, got = _grads(plain), _grads(once_model)
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12)
    # Leaving the block releases the held kernels: the next forward composes afresh.
    assert all(layer._held is None for layer in layers)
    held = layers[0].equivalent()[0]
    assert not held.is_leaf


def test_held_kernels_are_not_used_without_autograd():
    model = _model()
    layers = [layer for _, layer in expandctl.expanded_layers(model)]
    with ComposeOnce(layers):
        held = layers[0].equivalent()[0]
        with torch.no_grad():
            exact = layers[0].equivalent()[0]
        assert held.is_leaf and held.requires_grad
        assert exact is not held  # contraction and checks inside the block still compose exactly
        assert torch.equal(expandctl.contract(layers[0]).weight, exact)


@pytest.mark.parametrize("options", [{}, {"weight_decay": 1e-3, "decay_on": "product"}], ids=["plain", "product-l2"])
def test_train_accumulate_equals_plain_accumulation(src, tmp_path, monkeypatch, options):
    # 512 synthetic training images at batch 64: 8 mini-batches per epoch, steps of 3, 3 and 2.
    train(config(src, tmp_path / "once", accumulate=3, **options))
    with monkeypatch.context() as m:
        m.setattr(epoch_module, "compose_once", lambda run: None)  # compose and backpropagate per batch
        train(config(src, tmp_path / "plain", accumulate=3, **options))
    train(config(src, tmp_path / "none", accumulate=1, **options))
    once, plain, none = (state_of(tmp_path / name / "last.pt") for name in ("once", "plain", "none"))
    assert same_weights(once, plain, atol=1e-6)
    assert not same_weights(once, none, atol=1e-3)  # accumulation did change the trajectory


def test_accumulate_validation_and_cli(src, tmp_path):
    with pytest.raises(UsageError, match="^accumulate must be at least 1") as e:
        train(config(src, tmp_path / "bad", accumulate=0))
    assert e.value.options == ("accumulate",)
    r = invoke(src, tmp_path / "cli", "--accumulate", "2", "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(tmp_path / "cli" / "last.pt").extra["train"]["config"]["accumulate"] == 2
    r = invoke(src, tmp_path / "cli0", "--accumulate", "0")
    assert r.exit_code != 0 and "--accumulate must be at least 1" in r.output


@pytest.mark.slow  # two 2-process torchrun runs: ~90 s on two busy cores
def test_torchrun_accumulate_fused_equals_explicit(tmp_path):
    """Under DDP the fused path (ComposeOnce, unsynchronised micro-batches, one all-reduce) and the
    explicit path (plain accumulation, DDP syncing on each step's last backward) agree."""
    import os
    import subprocess
    import sys

    if not torch.distributed.is_gloo_available():
        pytest.skip("torch was built without gloo")
    src = make_src(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    states = {}
    for forward in ("fused", "explicit"):
        out = tmp_path / forward
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd += ["-m", "expandctl.commands.train", str(src), "--data", "synthetic", "--epochs", "1", "--quiet"]
        cmd += ["--batch-size", "32", "--accumulate", "3", "--lr", "0.1", "--forward", forward, "--out", str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        states[forward] = state_of(out / "last.pt")
    assert same_weights(states["fused"], states["explicit"], atol=1e-5)
