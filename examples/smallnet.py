"""The paper's SmallNet variants, as examples/reproduce.py trains them: parameters and expansion plans.

SmallNet itself lives in the architecture registry (``expandctl.models.SmallNet``, arch spec
``smallnet``); this script only shows what each variant of the paper's table trains, for kernel
sizes 3/5/7/9 and 1- or 3-channel input, and checks that each one contracts back to the compact
parameter count.

    python examples/smallnet.py [--in-channels 1] [--image-size 28] [--rate 4]
"""

from __future__ import annotations

import argparse

import torch

import expandctl
from expandctl.models import SmallNet

#: variant -> (strategy, exclude). FC expands only the hidden Linear, never the logits (the paper's code).
VARIANTS = {
    "compact": (None, ()),
    "fc": ("fc", ("classifier.3",)),
    "cl": ("cl", ()),
    "cl+fc": ("cl+fc", ("classifier.3",)),
    "ck": ("ck", ()),
    "ck+fc": ("ck+fc", ("classifier.3",)),
}
KERNELS = (3, 5, 7, 9)


def build(variant: str, kernel_size: int, in_channels: int, image_size: int, rate: float, seed: int = 0):
    """``(model, plan)`` for one table cell; ``plan`` is ``None`` for the compact model. CK variants
    need a kernel > 3 (the paper's "-"): :class:`expandctl.NothingToExpandError` for k <= 3."""
    strategy, exclude = VARIANTS[variant]
    if "ck" in variant.split("+") and kernel_size <= 3:
        raise expandctl.NothingToExpandError(f"{variant}: CK needs a kernel larger than 3x3 (got {kernel_size})")
    torch.manual_seed(seed)
    model = SmallNet(kernel_size=kernel_size, in_channels=in_channels, image_size=image_size)
    if strategy is None:
        return model, None
    plan = expandctl.plan(model, strategy, rate, exclude=exclude)
    return expandctl.expand(model, strategy, rate, exclude=exclude, seed=seed), plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-channels", type=int, default=1, help="1 (MNIST-like) or 3 (CIFAR)")
    ap.add_argument("--image-size", type=int, default=None, help="default: 28 for 1 channel, 32 for 3")
    ap.add_argument("--rate", type=float, default=4)
    args = ap.parse_args()
    size = args.image_size or (28 if args.in_channels == 1 else 32)

    shape = f"{args.in_channels}x{size}x{size}"
    print(f"SmallNet, {shape} input, rate {args.rate:g}: parameters trained (after contraction)")
    print(f"{'variant':<9}" + "".join(f"{f'k={k}':>22}" for k in KERNELS))
    plans = {}
    for variant in VARIANTS:
        cells = []
        for k in KERNELS:
            try:
                model, plan = build(variant, k, args.in_channels, size, args.rate)
            except expandctl.NothingToExpandError:
                cells.append("-")
                continue
            compact = expandctl.contract(model)
            reference = SmallNet(kernel_size=k, in_channels=args.in_channels, image_size=size)
            n_compact = sum(p.numel() for p in compact.parameters())
            if n_compact != sum(p.numel() for p in reference.parameters()):
                raise SystemExit(f"{variant} k={k}: contracted model has {n_compact} parameters, not the compact count")
            cells.append(f"{sum(p.numel() for p in model.parameters()):,} ({n_compact:,})")
            if plan is not None and variant in ("cl", "ck") and k == 7:
                plans[variant] = plan
        print(f"{variant:<9}" + "".join(f"{c:>22}" for c in cells))

    for variant, plan in plans.items():
        print(f"\n{variant} plan, k=7:")
        for e in plan.expanded:
            print(f"  {e.path:<14} {e.shape:<28} -> {', '.join(e.factors)}")


if __name__ == "__main__":
    main()
