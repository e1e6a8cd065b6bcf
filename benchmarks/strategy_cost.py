"""Training cost of every expansion strategy relative to the compact model, measured in one run.

For each model (SmallNet 7x7 with the paper's channels on 3x32x32, and torchvision's MobileNetV2
on 3x64x64), the compact model and its expansion by every strategy are trained with SGD + momentum
on a fixed batch:

* **time**: all configurations are built in one process and stepped in turn (one step each, then
  the next), so machine load hits them alike; median step time and its ratio to the compact
  model's, per process; ``--rounds`` processes give the median ratio and its range;
* **memory**: each configuration in its own process: the peak RSS over warm-up and timed steps
  minus the RSS before the model was built (parameters, gradients, momentum, activations and
  composition buffers; torch itself left out), and its ratio to the compact model's.

Strategies: ExpandNets ``ck`` / ``cl`` at rate 4 (fused: one composed kernel per layer), the
parallel-branch kinds ``acb``, ``rep``, ``dbb`` (BatchNorm branches run on the activations while
training) and ``orepa`` (composed every step, one conv and one BatchNorm), at their default rates.

    python benchmarks/strategy_cost.py [--models smallnet mobilenet_v2] [--batch 128] [--steps 20]
                                       [--rounds 3] [--threads 1] [--json out.json]

Run it alone on the machine: on two cores a concurrent process distorts timings by 10-100x.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

#: (row name, strategy, rate); ``None`` strategy = the compact model.
CONFIGS = [
    ("compact", None, None),
    ("ck r=4", "ck", 4),
    ("cl r=4", "cl", 4),
    ("acb", "acb", None),
    ("rep", "rep", None),
    ("dbb", "dbb", None),
    ("orepa", "orepa", None),
]
#: model -> (builder, input shape, default batch)
MODELS = {
    "smallnet": ("expandctl.models:SmallNet", {"kernel_size": 7}, (3, 32, 32), 128),
    "mobilenet_v2": ("torchvision.models:mobilenet_v2", {"num_classes": 10}, (3, 64, 64), 32),
}


def _build(model_name: str, strategy: str | None, rate):
    import torch

    import expandctl
    from expandctl.models import build_arch

    spec, kwargs, _, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = build_arch(spec, kwargs)
    if strategy is not None:
        try:
            model = expandctl.expand(model, strategy=strategy, rate=rate, seed=0)
        except expandctl.NothingToExpandError:
            return None
    return model


def _stepper(model, shape, batch):
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def interleaved(model_name: str, batch: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    shape = MODELS[model_name][2]
    steppers = {}
    for name, strategy, rate in CONFIGS:
        model = _build(model_name, strategy, rate)
        if model is not None:
            steppers[name] = _stepper(model, shape, batch)
    times: dict = {name: [] for name in steppers}
    for k in range(steps + 2):
        for name, step in steppers.items():
            t0 = time.perf_counter()
            step()
            if k >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {name: {"median_ms": ms, "time_ratio": ms / med["compact"]} for name, ms in med.items()}


def memory(model_name: str, strategy: str | None, rate, batch: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    with open("/proc/self/statm") as f:  # resident set before the model exists: torch and the data
        base_mib = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    model = _build(model_name, strategy, rate)
    if model is None:
        return {}
    step = _stepper(model, MODELS[model_name][2], batch)
    for _ in range(2 + steps):
        step()
    return {
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mib,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=0, help="batch size (default: per model, 128 / 32)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="processes for the time ratios")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--one-time", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--one-memory", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_time:
        m, b = args.one_time
        print(json.dumps(interleaved(m, int(b), args.steps, args.threads)))
        return
    if args.one_memory:
        m, s, r, b = args.one_memory
        strategy = None if s == "-" else s
        rate = None if r == "-" else float(r)
        print(json.dumps(memory(m, strategy, rate, int(b), args.steps, args.threads)))
        return
    rows = []
    common = ["--steps", str(args.steps), "--threads", str(args.threads)]
    for m in args.models:
        batch = args.batch or MODELS[m][3]
        rounds = [_child(*common, "--one-time", m, str(batch)) for _ in range(args.rounds)]
        mem = {}
        for name, strategy, rate in CONFIGS:
            mem[name] = _child(*common, "--one-memory", m, strategy or "-", str(rate) if rate else "-", str(batch))
        for name, _, _ in CONFIGS:
            if name not in rounds[0]:
                rows.append({"model": m, "batch": batch, "config": name, "skipped": "selects no layer"})
                continue
            ratios = [r[name]["time_ratio"] for r in rounds]
            rows.append(
                {
                    "model": m,
                    "batch": batch,
                    "config": name,
                    "step_ms": statistics.median(r[name]["median_ms"] for r in rounds),
                    "time_ratio": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "peak_mib": mem[name]["peak_mib"],
                    "train_mib": mem[name]["train_mib"],
                    "mem_ratio": mem[name]["train_mib"] / mem["compact"]["train_mib"],
                    "params": mem[name]["params"],
                }
            )
    print(
        f"SGD training step, {args.threads} thread(s), {args.steps} steps; time: configurations interleaved in one "
        f"process, median ratio to compact over {args.rounds} processes (range); memory: peak RSS above the RSS before "
        "the model was built, one process each"
    )
    print(f"{'model':13} {'batch':>5} {'config':8} {'step ms':>8} {'x compact':>9} {'range':>11} {'train MiB':>9} "
          f"{'x compact':>9} {'params':>10}")  # fmt: skip
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:13} {r['batch']:>5} {r['config']:8} {'(' + r['skipped'] + ')':>40}")
            continue
        print(f"{r['model']:13} {r['batch']:>5} {r['config']:8} {r['step_ms']:>8.1f} {r['time_ratio']:>9.2f} "
              f"{r['ratio_min']:>5.2f}-{r['ratio_max']:<5.2f} {r['train_mib']:>9.0f} {r['mem_ratio']:>9.2f} "
              f"{r['params']:>10,}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
