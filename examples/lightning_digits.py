"""A small CNN trained on the bundled digits with Lightning and ExpandNetsCallback, exported compact to ONNX.

The LightningModule is ordinary Lightning code; the one line that involves expandctl is the callback.
It expands the CNN before the optimizer is built (CK on the 5x5 conv, CL on the 3x3 ones), trains
the fused chains, and at the end of the fit contracts them, checks the compact model against the
chains (float64 and float32) and writes the compact ONNX file (checked with onnxruntime)::

    python examples/lightning_digits.py [OUT] [--epochs 15] [--strategy ck+cl] [--devices 2]

``--devices 2`` trains with Lightning's DDP on the CPU (gloo), one process per device. Prints the
last validation accuracy of the expanded model, the compact module's and the ONNX file's.
Resume a stopped run with ``--resume OUT/last.ckpt`` (the same settings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import expandctl
from expandctl.data import load_data
from expandctl.integrations.lightning import ExpandNetsCallback


class DigitsCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.classifier = nn.Linear(32, classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class LitDigits(L.LightningModule):
    def __init__(self, lr: float = 0.05, epochs: int = 15):
        super().__init__()
        self.save_hyperparameters()
        self.net = DigitsCNN()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.hparams.epochs)]


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """expandctl's digits split (80/20, stratified, normalised) as two DataLoaders."""
    splits = load_data("digits", augment=False)
    train = TensorDataset(*splits.train[list(range(len(splits.train)))])
    val = TensorDataset(*splits.val[list(range(len(splits.val)))])
    return DataLoader(train, batch_size, shuffle=True), DataLoader(val, 256)


def weights_sha(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def onnx_accuracy(path: Path, loader: DataLoader) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    right = total = 0
    for x, y in loader:
        (logits,) = session.run(None, {name: x.numpy()})
        right += int((np.argmax(logits, 1) == y.numpy()).sum())
        total += len(y)
    return right / total


def main(
    out: Path, epochs: int = 15, strategy: str = "ck+cl", devices: int = 1, seed: int = 0, resume: str | None = None
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, workers=True, verbose=False)
    train, val = digits_loaders()
    module = LitDigits(epochs=epochs)
    expand = ExpandNetsCallback(strategy=strategy, export=out / "digits.onnx", seed=seed)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        callbacks=[expand, L.callbacks.ModelCheckpoint(dirpath=out, save_last=True)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module, train, val, ckpt_path=resume)
    expanded_acc = float(trainer.callback_metrics["val_acc"])  # the last validation, still expanded
    compact_acc = float(trainer.validate(module, val, verbose=False)[0]["val_acc"])
    result = {
        "rank": trainer.global_rank,
        "strategy": strategy,
        "epochs": trainer.current_epoch,
        "expanded_layers_left": len(list(expandctl.expanded_layers(module))),
        "params": sum(p.numel() for p in module.parameters()),
        "expanded_val_acc": expanded_acc,
        "compact_val_acc": compact_acc,
        "checks": [r.summary() for r in expand.reports],
        "weights_sha": weights_sha(module),
    }
    if trainer.is_global_zero:
        result["onnx"] = str(out / "digits.onnx")
        result["onnx_val_acc"] = onnx_accuracy(out / "digits.onnx", val)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="lightning-digits-out", type=Path)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--strategy", default="ck+cl")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", help="a Lightning checkpoint of this run (OUT/last.ckpt)")
    args = ap.parse_args()
    print(json.dumps(main(args.out, args.epochs, args.strategy, args.devices, args.seed, args.resume)), flush=True)
