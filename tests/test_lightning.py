"""ExpandNetsCallback: Lightning trains the expanded model and ends the fit with the compact one, checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import load_script

import expandctl
from expandctl.errors import CheckFailed, UsageError
from expandctl.integrations.lightning import ExpandNetsCallback

ROOT = Path(__file__).resolve().parents[1]
example = load_script("lightning_digits")


@pytest.fixture(scope="module")
def digits():
    return example.digits_loaders()


def _trainer(tmp_path, callbacks, epochs=2, batches=None, **kw):
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_train_batches=batches,
        num_sanity_val_steps=0,
        **kw,
    )


class Probe(L.Callback):
    """What the optimizer holds when training starts, and the weights the module starts from."""

    def on_train_start(self, trainer, pl_module):
        self.optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.factors = {id(p) for _, layer in expandctl.expanded_layers(pl_module) for p in layer.parameters()}
        self.module_params = {id(p) for p in pl_module.parameters()}
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.momentum = [trainer.optimizers[0].state[p].get("momentum_buffer") for p in pl_module.parameters()]


def test_fit_on_digits_ends_compact_at_the_expanded_models_last_validation(tmp_path, digits):
    train, val = digits
    L.seed_everything(0, verbose=False)
    module = example.LitDigits(epochs=3)
    net, types = module.net, {n: type(m) for n, m in module.named_modules()}
    callback, probe = ExpandNetsCallback(strategy="ck+cl", export=tmp_path / "m.onnx"), Probe()
    trainer = _trainer(tmp_path, [callback, probe], epochs=3)
    trainer.fit(module, train, val)
    last_val = float(trainer.callback_metrics["val_acc"])

    # the optimizer held the expanded factors, and nothing else
    assert probe.factors and probe.factors <= probe.optimized and probe.optimized == probe.module_params
    # the module ends compact: the same net object, the original classes at every path
    assert module.net is net and not list(expandctl.expanded_layers(module))
    assert {n: type(m) for n, m in module.named_modules()} == types
    assert [r.dtype for r in callback.reports] == ["float64", "float32"]
    assert all(r.passed for r in callback.reports)
    # its accuracy is the expanded model's last validation
    compact_acc = float(trainer.validate(module, val, verbose=False)[0]["val_acc"])
    assert compact_acc == last_val
    assert last_val > 0.8  # it trained (3 epochs)
    # the exported ONNX file is the compact module
    assert callback.export_report is not None and callback.export_report.passed
    assert example.onnx_accuracy(tmp_path / "m.onnx", val) == pytest.approx(compact_acc, abs=1e-6)


def test_resumed_fit_loads_the_expanded_checkpoint_and_ends_compact(tmp_path, digits):
    train, val = digits
    L.seed_everything(0, verbose=False)
    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = _trainer(tmp_path, [ExpandNetsCallback(strategy="ck+cl"), saver], epochs=1, batches=5)
    first.fit(example.LitDigits(), train, val)
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(".factors." in k for k in saved["state_dict"])  # written mid-training: expanded weights
    assert set(saved["expandctl"]["layout"]) == {"net.features.0", "net.features.3", "net.features.7"}

    fresh, probe = example.LitDigits(), Probe()  # compact, random weights
    second = _trainer(tmp_path, [ExpandNetsCallback(strategy="ck+cl"), probe], epochs=2, batches=5)
    second.fit(fresh, train, val, ckpt_path=tmp_path / "last.ckpt")
    # training restarted from the checkpoint's expanded weights and optimizer state
    assert probe.state.keys() == saved["state_dict"].keys()
    assert all(torch.equal(probe.state[k], v) for k, v in saved["state_dict"].items())
    assert all(m is not None for m in probe.momentum)
    assert second.global_step == 10 and second.current_epoch == 2
    assert not list(expandctl.expanded_layers(fresh))


def test_resume_with_another_layout_is_refused(tmp_path, digits):
    train, val = digits
    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(tmp_path, [ExpandNetsCallback(strategy="ck+cl"), saver], epochs=1, batches=2).fit(
        example.LitDigits(), train, val
    )
    for strict in (True, False):  # not strict: Lightning would load what fits and drop the rest
        fresh = example.LitDigits()
        fresh.strict_loading = strict
        with pytest.raises(UsageError, match="do not fit the layer 'net.features.0'.*strategy='cl'"):
            _trainer(tmp_path, [ExpandNetsCallback(strategy="cl")], epochs=2, batches=2).fit(
                fresh, train, val, ckpt_path=tmp_path / "last.ckpt"
            )


def test_a_failed_check_at_fit_end_raises_and_leaves_the_module_expanded(tmp_path, digits, monkeypatch):
    import expandctl.rewrite as rewrite_module
    from expandctl.rewrite import contract

    def wrong_contract(model, inplace=False):  # a contraction bug: one weight off by far more than rounding
        small = contract(model, inplace)
        with torch.no_grad():
            small.net.classifier.weight.add_(1e-2)
        return small

    monkeypatch.setattr(rewrite_module, "contract", wrong_contract)  # the contraction the check compares against
    module = example.LitDigits()
    with pytest.raises(CheckFailed, match="not written back"):
        _trainer(tmp_path, [ExpandNetsCallback(strategy="ck+cl+fc")], epochs=1, batches=2).fit(module, digits[0])
    assert list(expandctl.expanded_layers(module))  # the trained expanded weights are kept, not half-contracted


def test_validate_alone_leaves_the_module_compact(tmp_path, digits):
    module = example.LitDigits()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _trainer(tmp_path, [ExpandNetsCallback(strategy="ck+cl")]).validate(module, digits[1], verbose=False)
    assert not list(expandctl.expanded_layers(module))
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


def test_a_module_without_forward_is_refused_before_training(tmp_path, digits):
    class NoForward(example.LitDigits):
        forward = L.LightningModule.forward

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

    with pytest.raises(UsageError, match="defines no forward"):
        _trainer(tmp_path, [ExpandNetsCallback(strategy="ck+cl")], batches=1).fit(NoForward(), digits[0])


def test_bad_settings_fail_at_construction():
    with pytest.raises(UsageError, match="unknown strategy"):
        ExpandNetsCallback(strategy="ck+nope")
    with pytest.raises(UsageError, match="rate"):
        ExpandNetsCallback(rate=0.5)
    with pytest.raises(UsageError, match=".onnx"):
        ExpandNetsCallback(export="model.pt")


def test_the_core_package_does_not_import_lightning():
    code = (
        "import sys, expandctl, expandctl.cli, expandctl.context; "
        "print([m for m in ('lightning', 'pytorch_lightning') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_example_trains_digits_and_exports_the_compact_onnx(tmp_path):
    result = example.main(tmp_path, epochs=2)
    assert result["expanded_layers_left"] == 0
    assert result["compact_val_acc"] == result["expanded_val_acc"] > 0.5
    assert result["onnx_val_acc"] == pytest.approx(result["compact_val_acc"], abs=1e-6)
    assert all("passed" in line for line in result["checks"])


@pytest.mark.slow
def test_ddp_on_cpu_two_processes_ends_compact_on_both_ranks(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "examples" / "lightning_digits.py"), str(tmp_path), "--epochs", "2",
           "--devices", "2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["rank"]: r for r in (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))}
    assert set(results) == {0, 1}
    assert all(r["expanded_layers_left"] == 0 for r in results.values())
    assert results[0]["weights_sha"] == results[1]["weights_sha"]  # the replicas stayed in sync
    assert results[0]["compact_val_acc"] == results[0]["expanded_val_acc"]
    assert results[0]["onnx_val_acc"] == pytest.approx(results[0]["compact_val_acc"], abs=1e-6)
