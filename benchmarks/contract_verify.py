"""Contract + verify time of fully expanded torchvision models (no weights), on this CPU.

For resnet50 and mobilenet_v2 (1000 classes, random BatchNorm statistics so eval mode matters),
expand with ``ck+cl+fc`` at rate 4 (and with ``--pointwise``, 1x1 convolutions too, when the
expanded model fits in memory), then time

* ``expandctl.contract`` (multiplying every chain out),
* ``verify.check_contraction`` in float32 only, and in float64 + float32 (the CLI's default),
  with the default 2 samples x batch 2 at 224x224; the expanded model runs its chains explicitly,

and print a table: seconds, the worst relative error per dtype, and contract + verify against the
10 s target. No assertion on absolute times: they depend on the machine and its load.

    python benchmarks/contract_verify.py [--threads 1] [--models resnet50,mobilenet_v2] [--json out.json]

Run it alone on the machine: a concurrent process distorts the timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import time

import torch
import torchvision

import expandctl
from expandctl.verify import check_contraction

TARGET_S = 10.0
INPUT = (3, 224, 224)


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


def bench(name: str, pointwise: bool, strategy: str, rate: float) -> dict:
    model = build(name)
    plan = expandctl.plan(model, strategy, rate, pointwise=pointwise)
    compact_params = sum(p.numel() for p in model.parameters())
    expanded_params = compact_params - plan.params_before + plan.params_after
    row = {
        "model": name, "strategy": strategy + (" +pointwise" if pointwise else ""), "rate": rate,
        "layers_expanded": len(plan.expanded), "params_compact": compact_params, "params_expanded": expanded_params,
    }  # fmt: skip
    # The float64 check widens a copy of the factors: about 3x the float32 model at once, plus activations.
    need = expanded_params * 4 * 3 + (2 << 30)
    if need > 0.8 * mem_available_bytes():
        row["skipped"] = f"needs about {need / 2**30:.1f} GiB, {mem_available_bytes() / 2**30:.1f} GiB available"
        return row

    t0 = time.perf_counter()
    big = expandctl.expand(model, strategy, rate, pointwise=pointwise, seed=0).eval()
    row["expand_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    small = expandctl.contract(big)
    row["contract_s"] = time.perf_counter() - t0
    if sum(p.numel() for p in small.parameters()) != compact_params:
        raise SystemExit(f"{name}: the contracted model does not have the compact parameter count")

    t0 = time.perf_counter()
    (r32,) = check_contraction(big, small, INPUT, dtypes=(torch.float32,))
    row["verify_f32_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    r64, r32b = check_contraction(big, small, INPUT)  # the default: float64 then float32
    row["verify_f64_f32_s"] = time.perf_counter() - t0

    row["max_rel_f32"], row["max_rel_f64"] = r32.max_rel, r64.max_rel
    row["passed"] = r32.passed and r64.passed and r32b.passed
    row["contract_verify_f32_s"] = row["contract_s"] + row["verify_f32_s"]
    row["contract_verify_f64_f32_s"] = row["contract_s"] + row["verify_f64_f32_s"]
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del big, small
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,mobilenet_v2")
    ap.add_argument("--strategy", default="ck+cl+fc")
    ap.add_argument("--rate", type=float, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-pointwise", action="store_true", help="skip the --pointwise rows")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for name in args.models.split(","):
        for pointwise in (False,) if args.no_pointwise else (False, True):
            rows.append(bench(name, pointwise, args.strategy, args.rate))
            print(json.dumps(rows[-1]), flush=True)

    cpu = platform.processor() or platform.machine()
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s), {cpu}")
    print(f"input 2 samples x batch 2 x {'x'.join(map(str, INPUT))}; target: contract + verify <= {TARGET_S:g} s\n")
    head = ("model", "strategy", "params (expanded)", "contract s", "verify f32 s", "verify f64+f32 s",
            "c+v f32 / target", "c+v f64+f32 / target", "max_rel f64", "max_rel f32")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        if "skipped" in r:
            print(f"| {r['model']} | {r['strategy']} | {r['params_expanded']:,} | skipped: {r['skipped']} |")
            continue
        print(
            f"| {r['model']} | {r['strategy']} | {r['params_expanded']:,} | {r['contract_s']:.2f} | "
            f"{r['verify_f32_s']:.2f} | {r['verify_f64_f32_s']:.2f} | "
            f"{r['contract_verify_f32_s'] / TARGET_S:.2f} | {r['contract_verify_f64_f32_s'] / TARGET_S:.2f} | "
            f"{r['max_rel_f64']:.1e} | {r['max_rel_f32']:.1e} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "torch": str(torch.__version__), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
