"""Training-step cost of expanded SmallNets relative to the compact one, measured in one run.

SmallNet 7x7 (paper channels 8/16/32, and a wide 32/64/128 variant), 3x32x32 inputs, SGD with
momentum: median time of forward + backward + optimizer step, and peak memory, for the compact
model and its CK / CL r=4 expansions trained fused. CK fused runs twice: with the old (direct)
composition and the new one (``composition="auto"``: pairwise Toom-Cook where the cost model
picks it, :func:`expandctl.algebra.composition_method`). For every expanded model the
composition alone (all its layers' kernels and biases, forward + backward) is also timed with
both paths, interleaved in the same process.

Columns: ``step`` median step time and its ratio to the compact model of the same thread count
and batch; ``compose`` the composition alone for the path that row trains with (its share of
the overhead ``step - compact step`` says what the rest is spent on); ``old/new`` how much
faster the new composition is than the old, alone; ``peak`` the process's peak RSS (CPU; torch
itself included) or peak allocated memory (CUDA), and its ratio to the compact model's.

Each configuration runs in its own subprocess (clean peak-memory accounting); ``--rounds R``
repeats the whole sequence and keeps each configuration's median.

    python benchmarks/train_step.py [--threads 1 2] [--batch 128 64] [--steps 30] [--rounds 1]
                                    [--explicit] [--device cpu|cuda] [--json out.json]
    python benchmarks/train_step.py --interleave [--rounds 3] ...   # time ratios only

``--interleave`` builds the compact model and every fused configuration in one process and steps
them in turn, so that what differs between processes (placement, allocator state, load) cannot
tell them apart; each of ``--rounds`` processes gives a ratio, the median and range are printed.

``--compile`` times ``torch.compile`` (inductor) against eager, interleaved in one process per model:
SmallNet 7x7 (batch 128, 3x32x32) compact and CK r=4, MobileNetV2 (batch 32, 3x64x64; the models of
``strategy_cost.py``) compact, CL r=4 and orepa, each eager and compiled; it prints each expanded
model's step ratio to the compact model of the same mode (compiled / compiled beside eager / eager),
the compile speed-up of each model and the compile time (first two steps)::

    python benchmarks/train_step.py --compile [--compile-models smallnet mobilenet_v2] [--threads 1] [--steps 20]
                                    [--rounds 1] [--json out.json]

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
#: (row name, strategy, forward mode, composition method)
CONFIGS = [
    ("compact", None, None, None),
    ("ck r=4 fused old", "ck", "fused", "direct"),
    ("ck r=4 fused new", "ck", "fused", "auto"),
    ("cl r=4 fused", "cl", "fused", "auto"),
    ("orepa fused", "orepa", "fused", "auto"),
]
EXPLICIT = [("ck r=4 explicit", "ck", "explicit", "direct"), ("cl r=4 explicit", "cl", "explicit", "direct")]
#: ``--compile``: per model of strategy_cost.MODELS, the expansions timed beside the compact model.
COMPILE_CASES = {"smallnet": [("ck r=4", "ck", 4)], "mobilenet_v2": [("cl r=4", "cl", 4), ("orepa", "orepa", None)]}


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compose_ms(layers, method: str, device) -> float:
    """One forward + backward of every layer's composition (what a fused step adds), in ms."""
    import torch

    _sync(device)
    t0 = time.perf_counter()
    for layer in layers:
        layer.composition = method
        weight, bias = layer.equivalent()
        outs = [weight] + ([bias] if bias is not None else [])
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _setup(variant, strategy, forward, composition, batch, device):
    """``(model, its expanded layers, step())``: one SGD step of SmallNet 7x7 on a fixed batch."""
    import torch

    import expandctl
    from expandctl.models import SmallNet

    torch.manual_seed(0)
    model = SmallNet(kernel_size=7, channels=VARIANTS[variant])
    if strategy:
        rate = 4 if strategy in ("ck", "cl") else None  # the branch kinds at their own default
        model = expandctl.expand(model, strategy=strategy, rate=rate, forward=forward, seed=0)
    # Chains only: their composition is what this benchmark times on its own (orepa composes its
    # branches every step too, but is timed as a whole step only).
    layers = [layer for _, layer in expandctl.expanded_layers(model) if isinstance(layer, expandctl.layers.ChainLayer)]
    for layer in layers:
        layer.composition = composition
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return model, layers, step


def interleaved(variant, batch, steps, threads, device_name) -> dict:
    """Every configuration of :data:`CONFIGS` built in one process and stepped in turn (one step
    each, ``steps`` times), so that a change of machine load or of process placement hits all of
    them alike: median step time and ratio to the compact model. No memory figures here."""
    import torch

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    steps_of = {name: _setup(variant, s, f, c, batch, device)[2] for name, s, f, c in CONFIGS}
    times: dict = {name: [] for name in steps_of}
    for k in range(steps + 3):
        for name, step in steps_of.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            if k >= 3:  # warm-up
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {name: {"median_ms": ms, "time_ratio": ms / med["compact"]} for name, ms in med.items()}


def compiled_vs_eager(model_name: str, steps: int, threads: int) -> dict:
    """The compact model and each expansion of :data:`COMPILE_CASES`, eager and ``torch.compile``d,
    stepped in turn in this process (SGD + momentum, strategy_cost's fixed batch): median step time
    per configuration, and the seconds the first two steps took (compilation)."""
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))  # compile workers share the cores too
    import torch
    from strategy_cost import MODELS, _build, _stepper

    torch.set_num_threads(threads)
    _, _, shape, batch = MODELS[model_name]
    steppers, first = {}, {}
    for name, strategy, rate in [("compact", None, None), *COMPILE_CASES[model_name]]:
        for mode in ("eager", "compiled"):
            model = _build(model_name, strategy, rate)
            step = _stepper(torch.compile(model) if mode == "compiled" else model, shape, batch)
            t0 = time.perf_counter()
            step(), step()  # compiles (forward and backward graphs) in compiled mode
            first[(name, mode)] = time.perf_counter() - t0
            steppers[(name, mode)] = step
    times: dict = {key: [] for key in steppers}
    for _ in range(steps):
        for key, step in steppers.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    med = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    return {
        name: {
            mode: {"median_ms": med[(name, mode)], "ratio": med[(name, mode)] / med[("compact", mode)],
                   "first_two_steps_s": first[(name, mode)]}
            for mode in ("eager", "compiled")
        }
        for name in dict.fromkeys(n for n, _ in steppers)
    }  # fmt: skip


def _main_compile(args) -> None:
    import torch

    rows = []
    for m in args.compile_models:
        rounds = [_child(args, "--one-compile", m, str(args.threads[0])) for _ in range(args.rounds)]
        for name in rounds[0]:
            row = {"model": m, "config": name, "threads": args.threads[0]}
            for mode in ("eager", "compiled"):
                ratios = [r[name][mode]["ratio"] for r in rounds]
                row[f"{mode}_ms"] = statistics.median(r[name][mode]["median_ms"] for r in rounds)
                row[f"{mode}_ratio"] = statistics.median(ratios)
                row[f"{mode}_ratio_range"] = [min(ratios), max(ratios)]
                row[f"{mode}_first_two_steps_s"] = statistics.median(r[name][mode]["first_two_steps_s"] for r in rounds)
            row["compile_speedup"] = row["eager_ms"] / row["compiled_ms"]
            rows.append(row)
    print(f"torch {torch.__version__}, torch.compile (inductor) vs eager on {args.device}, {args.threads[0]} "
          f"thread(s); SGD step, configurations interleaved in one process per model, {args.steps} steps each, "
          f"{args.rounds} process(es); x compact: step time / the compact model's in the same mode")  # fmt: skip
    print(f"{'model':13} {'config':8} {'eager ms':>9} {'x compact':>9} {'compiled ms':>11} {'x compact':>9} "
          f"{'eager/compiled':>14} {'compile s':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['model']:13} {r['config']:8} {r['eager_ms']:>9.1f} {r['eager_ratio']:>9.2f} "
              f"{r['compiled_ms']:>11.1f} {r['compiled_ratio']:>9.2f} {r['compile_speedup']:>14.2f} "
              f"{r['compiled_first_two_steps_s']:>9.1f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def measure(variant, strategy, forward, composition, batch, steps, threads, device_name) -> dict:
    import torch

    import expandctl

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model, layers, step = _setup(variant, strategy, forward, composition, batch, device)

    base = _rss_kib()  # model, data and optimizer exist; gradients, momentum and activations not yet
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):  # warm-up: allocator, momentum buffers, kernels
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        step_mib = peak_mib
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mib, step_mib = peak / 1024, max(peak - base, 0) / 1024
    result = {
        "median_ms": statistics.median(times) * 1e3,
        "peak_mib": peak_mib,
        "step_mib": step_mib,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if layers and forward == "fused":
        old, new = [], []
        for _ in range(2):  # warm-up both paths
            _compose_ms(layers, "direct", device), _compose_ms(layers, "auto", device)
        for _ in range(max(steps // 2, 5)):  # interleaved, so load changes hit both alike
            old.append(_compose_ms(layers, "direct", device))
            new.append(_compose_ms(layers, "auto", device))
        result["compose_old_ms"] = statistics.median(old)
        result["compose_new_ms"] = statistics.median(new)
        shapes = [tuple(tuple(f.weight.shape) for f in layer.factors) for layer in layers]
        result["methods"] = [expandctl.algebra.composition_method(s, layers[0].factors[0].weight.dtype) for s in shapes]
    return result


def _child(args, *mode: str):
    """This script run in a subprocess in a ``--one`` / ``--one-interleaved`` mode: its JSON result."""
    cmd = [sys.executable, __file__, "--steps", str(args.steps), "--device", args.device, *mode]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _one(args, variant, strategy, forward, composition, batch, threads) -> dict:
    dash = [a or "-" for a in (strategy, forward, composition)]
    return _child(args, "--one", variant, *dash, str(batch), str(threads))


def _main_interleaved(args) -> None:
    rows = []
    for t in args.threads:
        for b in args.batch:
            for v in args.variants:
                rounds = [_child(args, "--one-interleaved", v, str(b), str(t)) for _ in range(args.rounds)]
                for name in rounds[0]:
                    ms = statistics.median(r[name]["median_ms"] for r in rounds)
                    ratios = [r[name]["time_ratio"] for r in rounds]
                    rows.append({"threads": t, "batch": b, "variant": v, "model": name, "median_ms": ms,
                                 "time_ratio": statistics.median(ratios), "ratio_min": min(ratios),
                                 "ratio_max": max(ratios)})  # fmt: skip
    print(f"SmallNet 7x7, 3x32x32, SGD step on {args.device}, configurations interleaved in one process; "
          f"{args.steps} steps each, {args.rounds} process(es): median ratio and its range over processes")  # fmt: skip
    print(f"{'thr':>3} {'batch':>5} {'variant':7} {'model':18} {'step ms':>9} {'x compact':>9} {'range':>11}")
    for r in rows:
        print(f"{r['threads']:>3} {r['batch']:>5} {r['variant']:7} {r['model']:18} {r['median_ms']:>9.1f} "
              f"{r['time_ratio']:>9.2f} {r['ratio_min']:>5.2f}-{r['ratio_max']:<5.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    default_threads = [int(os.environ["BENCH_THREADS"])] if os.environ.get("BENCH_THREADS") else [1, 2]
    ap.add_argument("--threads", type=int, nargs="+", default=default_threads)
    ap.add_argument("--batch", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=1, help="repeat everything, keep medians")
    ap.add_argument("--explicit", action="store_true", help="also time the chains run on activations (slow)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="instead: all configurations in one process, steps alternating (time ratios only)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="instead: torch.compile vs eager, SmallNet 7x7 CK and MobileNetV2 CL / orepa (ratios to compact)",
    )
    ap.add_argument("--compile-models", nargs="+", default=list(COMPILE_CASES), choices=list(COMPILE_CASES))
    ap.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--one-interleaved", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--one-compile", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_compile:
        m, t = args.one_compile
        print(json.dumps(compiled_vs_eager(m, args.steps, int(t))))
        return
    if args.compile:
        if args.device != "cpu":
            ap.error("--compile times the CPU (inductor's C++ backend); drop --device")
        _main_compile(args)
        return
    if args.one_interleaved:
        v, b, t = args.one_interleaved
        print(json.dumps(interleaved(v, int(b), args.steps, int(t), args.device)))
        return
    if args.interleave:
        _main_interleaved(args)
        return
    if args.one:
        v, s, f, c, b, t = args.one
        dash = lambda a: None if a == "-" else a  # noqa: E731
        print(json.dumps(measure(v, dash(s), dash(f), dash(c), int(b), args.steps, int(t), args.device)))
        return
    if args.device == "cuda":
        args.threads = args.threads[:1]
    configs = CONFIGS + (EXPLICIT if args.explicit else [])
    cases = [(t, b, v, c) for t in args.threads for b in args.batch for v in args.variants for c in configs]
    runs: dict = {}
    for _ in range(args.rounds):
        for t, b, v, (name, strategy, forward, composition) in cases:
            runs.setdefault((t, b, v, name), []).append(_one(args, v, strategy, forward, composition, b, t))
    rows = []
    for (t, b, v, name), results in runs.items():
        row = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "methods"}
        row.update(threads=t, batch=b, variant=v, model=name, methods=results[0].get("methods"))
        rows.append(row)
    for row in rows:
        t, b, v, name = row["threads"], row["batch"], row["variant"], row["model"]
        compact = next(r for r in rows if (r["threads"], r["batch"], r["variant"], r["model"]) == (t, b, v, "compact"))
        row["time_ratio"] = row["median_ms"] / compact["median_ms"]
        row["mem_ratio"] = row["peak_mib"] / compact["peak_mib"]
        if "compose_new_ms" in row:
            row["compose_ms"] = row["compose_old_ms" if name.endswith(" old") else "compose_new_ms"]
            row["compose_speedup"] = row["compose_old_ms"] / row["compose_new_ms"]
            row["overhead_ms"] = row["median_ms"] - compact["median_ms"]

    memory = "peak allocated (CUDA)" if args.device == "cuda" else "peak RSS"
    print(f"SmallNet 7x7, 3x32x32, SGD step on {args.device}; {args.steps} timed steps, {args.rounds} round(s); "
          f"compose = composition alone (fwd+bwd); old/new = composition speed-up; memory = {memory}")  # fmt: skip
    cols = ["thr", "batch", "variant", "model", "step ms", "x compact", "compose ms", "overhead ms", "old/new",
            "peak MiB", "x compact"]  # fmt: skip
    widths = [3, 5, 7, 18, 9, 9, 10, 11, 7, 8, 9]
    header = " ".join(f"{c:>{w}}" if k not in (2, 3) else f"{c:{w}}" for k, (c, w) in enumerate(zip(cols, widths)))
    print(header)
    print("-" * len(header))
    for r in rows:
        compose = " " * 30
        if "compose_ms" in r:
            compose = f"{r['compose_ms']:>10.1f} {r['overhead_ms']:>11.1f} {r['compose_speedup']:>7.2f}"
        print(f"{r['threads']:>3} {r['batch']:>5} {r['variant']:7} {r['model']:18} {r['median_ms']:>9.1f} "
              f"{r['time_ratio']:>9.2f} {compose} {r['peak_mib']:>8.0f} {r['mem_ratio']:>9.2f}")  # fmt: skip
    for v in args.variants:
        new = next((r for r in rows if r["variant"] == v and r["model"] == "ck r=4 fused new"), None)
        if new and new.get("methods"):
            print(f"{v}: new composition per CK layer: {', '.join(new['methods'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
