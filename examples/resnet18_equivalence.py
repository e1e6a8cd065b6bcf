"""Expand a torchvision ResNet-18, contract it back, and show that the two compute the same function.

The last step of `make demo`. Prints the expansion plan and the max abs / relative error of the contracted
model against the expanded one run in explicit mode (the chain applied to the activations).
"""

from __future__ import annotations

import sys
import time

import torch
import torchvision
from rich.console import Console
from rich.table import Table

import expandctl
from expandctl.console import plan_table

console = Console(width=None if sys.stdout.isatty() else 160)


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode means something
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    strategy, rate = "ck+cl+fc", 4
    plan = expandctl.plan(model, strategy=strategy, rate=rate)
    console.print(plan_table(plan))
    console.print(
        f"{len(plan.expanded)} of {len(plan.entries)} layers expanded; "
        f"their parameters {plan.params_before:,} -> {plan.params_after:,}"
    )

    t0 = time.perf_counter()
    big = expandctl.expand(model, strategy=strategy, rate=rate, seed=0)
    small = expandctl.contract(big)
    seconds = time.perf_counter() - t0
    same_structure = [type(m) for m in small.modules()] == [type(m) for m in model.modules()]
    console.print(f"expand + contract: {seconds:.2f} s; contracted model has the original structure: {same_structure}")
    del small

    results = Table(title="contracted vs expanded (explicit chain), eval mode, 4 random 3x224x224 images")
    for col in ("dtype", "max abs error", "max error / max |output|"):
        results.add_column(col)
    x = torch.randn(4, 3, 224, 224, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        # Contract in the dtype being checked: float64 separates the algebra from float32 rounding.
        reference = expandctl.set_forward(big.to(dtype), "explicit")
        small = expandctl.contract(reference)
        with torch.no_grad():
            expected = reference(x.to(dtype))
            got = small(x.to(dtype))
        err = (got - expected).abs().max().item()
        results.add_row(str(dtype).replace("torch.", ""), f"{err:.3e}", f"{err / expected.abs().max().item():.3e}")
    console.print(results)


if __name__ == "__main__":
    main()
