"""A non-classification model trained in your own loop: expandctl expands, contracts and checks around it.

A small encoder-decoder (``SegNet``: a stride-2 conv, BatchNorms, a transposed conv back to the
input size) trained for per-pixel classes with the ``dbb`` strategy, then contracted, checked
against its branches in float64 and float32, saved and exported with a symbolic image size.
``expandctl train`` is for classifiers; this is the whole recipe for anything else (the README's
"Python API" shows the loop; run this file to see it work: ``python examples/custom_loop.py OUT``).
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import expandctl
from expandctl.export import export_onnx
from expandctl.verify import check_contraction


class SegNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dec = nn.ConvTranspose2d(16, classes, 4, stride=2, padding=1)

    def forward(self, x):
        return self.dec(self.mid(self.enc(x)))


def main(out: Path, strategy: str = "dbb", steps: int = 20) -> list:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    loader = [(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8, 32, 32))) for _ in range(steps)]

    model = SegNet()  # any nn.Module
    big = expandctl.expand(model, strategy=strategy, seed=0)  # or "ck+cl", "orepa", "rep", ...
    opt = torch.optim.SGD(big.parameters(), lr=0.05, momentum=0.9)
    for x, mask in loader:  # your data, your loss
        loss = F.cross_entropy(big(x), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    big.eval()
    small = expandctl.contract(big)  # the compact model, exactly
    reports = check_contraction(big, small, (3, 32, 32))  # vs the branches, float64 and float32
    assert all(r.passed for r in reports), [r.summary() for r in reports]
    expandctl.save(small, out / "seg.pt", arch="custom_loop:SegNet", input_shape=(3, 32, 32))
    export_onnx(small, out / "seg.onnx", (3, 32, 32), dynamic_size=True)  # or: expandctl export --dynamic-size
    return reports


if __name__ == "__main__":
    for r in main(Path(sys.argv[1] if len(sys.argv) > 1 else "custom-loop-out")):
        print(r.summary())
