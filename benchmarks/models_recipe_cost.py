"""What one epoch of the ``models`` experiment (examples/figures.py) costs at each input size, per variant.

ShuffleNetV2 x0.5 and MobileNetV2 (width 0.5) divide their input by 32: at 32x32 their last feature
map is 1x1 (the ``real`` experiment's setting), at 48x48 and 64x64 it is 2x2. For each model, input
size and variant (compact, the CL choices, every branch kind), this trains SGD steps of one batch
of 128 gray-to-RGB images, the variants of one model and size stepped in turn so that machine load
hits them alike, and prints the median step time times the 79 batches of the 10,000 training images:
the training part of an epoch on one thread (the per-epoch curve on 2,000 test images adds ~7%).

    python benchmarks/models_recipe_cost.py [--sizes 32 48 64] [--steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import figures  # noqa: E402

import expandctl  # noqa: E402

BATCHES_PER_EPOCH = math.ceil(10_000 / 128)


def build(arch: str, strategy: str | None, include) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, **figures.REAL_MODELS[arch])
    if strategy:
        rate = None if strategy in figures.BRANCH_KINDS else 4
        model = expandctl.expand(model, strategy, rate, include=include, seed=0)
    return model


def measure(arch: str, size: int, steps: int) -> dict:
    variants = figures.model_variants(arch, figures.BRANCH_KINDS)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (128,), generator=gen)
    steppers = {}
    for v, (strategy, include) in variants.items():
        model = build(arch, strategy, include).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        steppers[v] = step
    times: dict[str, list[float]] = {v: [] for v in steppers}
    for k in range(steps + 1):
        for v, step in steppers.items():
            t0 = time.perf_counter()
            step()
            if k:  # the first step warms up
                times[v].append(time.perf_counter() - t0)
    epoch = {v: statistics.median(t) * BATCHES_PER_EPOCH for v, t in times.items()}
    return {v: {"epoch_s": round(s, 1), "x_compact": round(s / epoch["compact"], 2)} for v, s in epoch.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[32, 48, 64])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for arch in figures.REAL_MODELS:
        for size in args.sizes:
            for v, r in measure(arch, size, args.steps).items():
                rows.append({"model": arch, "size": size, "variant": v, **r})
                print(f"{arch:20s} {size:3d}x{size:<3d} {v:10s} {r['epoch_s']:7.1f} s/epoch  x{r['x_compact']:.2f}",
                      flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
