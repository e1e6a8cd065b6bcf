"""Training-step cost of expanded SmallNets relative to the compact one, measured in one run.

For SmallNet 7x7 (paper channels 8/16/32, and a wide 32/64/128 variant), batch 128, 3x32x32, SGD:
median time of forward + backward + optimizer step, and peak extra memory of the step, for
compact, CK r=4 and CL r=4 in fused and explicit modes. "peak" is the process's peak RSS (torch
itself included); "step" is the peak RSS growth from just before the first step (gradients,
momentum buffers, activations, composed kernels). Each configuration runs in its own
subprocess (clean peak-RSS accounting); ratios are to the compact model of the same run.

    python benchmarks/train_step.py [--steps 30] [--threads N] [--json out.json]

Run it alone on the machine: on two cores a concurrent process distorts timings by 10-100x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {"paper": (8, 16, 32), "wide": (32, 64, 128)}
CONFIGS = [
    ("compact", None, None),
    ("ck", "ck", "fused"),
    ("ck", "ck", "explicit"),
    ("cl", "cl", "fused"),
    ("cl", "cl", "explicit"),
]


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def measure(variant: str, strategy: str | None, forward: str | None, steps: int, threads: int) -> dict:
    import torch

    import expandctl
    from expandctl.models import SmallNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = SmallNet(kernel_size=7, channels=VARIANTS[variant])
    if strategy:
        model = expandctl.expand(model, strategy=strategy, rate=4, forward=forward, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    base = _rss_kib()  # model, data and optimizer exist; gradients, momentum and activations not yet
    for _ in range(3):  # warm-up: allocator, momentum buffers, kernels
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "median_ms": statistics.median(times) * 1e3,
        "peak_mib": peak / 1024,
        "step_mib": max(peak - base, 0) / 1024,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 0)) or os.cpu_count())
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--one", nargs=3, metavar=("VARIANT", "STRATEGY", "FORWARD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        v, s, f = args.one
        print(json.dumps(measure(v, None if s == "-" else s, None if f == "-" else f, args.steps, args.threads)))
        return
    rows = []
    for variant in VARIANTS:
        for name, strategy, forward in CONFIGS:
            cmd = [
                sys.executable,
                __file__,
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
                "--one",
                variant,
                strategy or "-",
                forward or "-",
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r.update(variant=variant, model=name if name == "compact" else f"{name} r=4 {forward}")
            rows.append(r)
            compact = next(c for c in rows if c["variant"] == variant and c["model"] == "compact")
            r["time_ratio"] = r["median_ms"] / compact["median_ms"]
            r["mem_ratio"] = r["peak_mib"] / compact["peak_mib"]
            r["step_mem_ratio"] = r["step_mib"] / max(compact["step_mib"], 1e-9)
    print(f"SmallNet 7x7, batch 128, 3x32x32, SGD step; {args.steps} timed steps; torch threads {args.threads}")
    cols = ["variant", "model", "params", "median ms", "x compact", "peak MiB", "x compact", "step MiB", "x compact"]
    widths = [8, 20, 10, 10, 10, 9, 10, 9, 10]
    header = " ".join(f"{c:>{w}}" if k > 1 else f"{c:{w}}" for k, (c, w) in enumerate(zip(cols, widths)))
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['variant']:8} {r['model']:20} {r['params']:>10,} {r['median_ms']:>10.1f} {r['time_ratio']:>10.2f} "
            f"{r['peak_mib']:>9.0f} {r['mem_ratio']:>10.2f} {r['step_mib']:>9.0f} {r['step_mem_ratio']:>10.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
