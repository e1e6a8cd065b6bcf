"""onnxruntime latency of a contracted model against the original compact model: same graph, same speed.

For each model, three ONNX files are exported with ``expandctl.export.export_onnx`` (each checked
against torch by onnxruntime before it is written; batch 1, static):

* ``original``: the compact model as built;
* ``contracted``: ``contract(expand(original))``, the model an ExpandNets training run ships;
* ``copied``: the original architecture with the contracted weights loaded (``strict=True``).

The original and contracted graphs must be the same: equal node counts and op-type histograms
(the script exits 1 otherwise). "copied" rules out a difference that only the weights' values
could cause. Latency: onnxruntime CPU, 1 intra-op thread, batch 1, runs interleaved (original,
contracted, copied, then the next round in rotated order) so that drift affects all alike; the
table gives medians and the ratio contracted / original.

    python benchmarks/onnx_latency.py [--rounds 200] [--models smallnet,resnet18,mobilenet_v2] [--json out.json]

Run it alone on the machine: a concurrent process distorts the timings.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

import expandctl
from expandctl.export import export_onnx
from expandctl.models import SmallNet

#: name -> (builder, input shape, strategy)
MODELS = {
    "smallnet": (lambda: SmallNet(kernel_size=7, in_channels=3, num_classes=10), (3, 32, 32), "ck+fc"),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=1000), (3, 224, 224), "ck+cl+fc"),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=1000), (3, 224, 224), "cl+fc"),
}


def build(name: str) -> tuple[torch.nn.Module, tuple[int, ...], str]:
    factory, shape, strategy = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model, shape, strategy


def histogram(path: Path) -> collections.Counter:
    graph = onnx.load(str(path)).graph
    return collections.Counter(node.op_type for node in graph.node)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latencies(paths: dict[str, Path], shape, rounds: int, warmup: int = 10) -> dict[str, list[float]]:
    sessions = {k: session(p) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    names = list(sessions)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for _ in range(warmup):
        for k in names:
            sessions[k].run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate who goes first
        for k in order:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    return times


def bench(name: str, rounds: int, folder: Path) -> dict:
    original, shape, strategy = build(name)
    contracted = expandctl.contract(expandctl.expand(original, strategy, rate=4, seed=1)).eval()
    copied = build(name)[0]
    copied.load_state_dict(contracted.state_dict(), strict=True)  # same modules, names and shapes
    paths = {}
    for label, model in (("original", original), ("contracted", contracted), ("copied", copied)):
        paths[label], _ = export_onnx(model, folder / f"{name}-{label}.onnx", shape, dynamic_batch=False)
    hist = {k: histogram(p) for k, p in paths.items()}
    # A contracted weight with permuted strides (e.g. channels-last) makes torch compute in that
    # layout, and torch.export then records it (as_strided / view nodes): name them if present.
    strided = [n for n, p in contracted.named_parameters() if not p.is_contiguous()]
    times = latencies(paths, shape, rounds)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "model": name,
        "strategy": strategy,
        "input": list(shape),
        "nodes": {k: sum(h.values()) for k, h in hist.items()},
        "same_graph": hist["original"] == hist["contracted"] == hist["copied"],
        "noncontiguous_contracted_params": strided,
        "op_types": dict(sorted(hist["original"].items())),
        "op_types_contracted": dict(sorted(hist["contracted"].items())),
        "median_ms": med,
        "p10_p90_ms": {k: [float(np.percentile(v, q) * 1e3) for q in (10, 90)] for k, v in times.items()},
        "ratio_contracted_original": med["contracted"] / med["original"],
        "ratio_copied_original": med["copied"] / med["original"],
        "rounds": rounds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=200, help="timed runs of each model (interleaved)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rounds = args.rounds if name == "smallnet" else max(20, args.rounds // 5)
            rows.append(bench(name, rounds, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)

    print(f"\nonnxruntime {ort.__version__}, CPU provider, 1 thread, batch 1, interleaved runs")
    head = ("model", "nodes orig / contr.", "same op histogram", "runs", "original ms", "contracted ms",
            "ratio", "copied-weights ratio", "non-contiguous contracted weights")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        m = r["median_ms"]
        print(
            f"| {r['model']} ({r['strategy']}) | {r['nodes']['original']} / {r['nodes']['contracted']} | "
            f"{'yes' if r['same_graph'] else 'NO'} | {r['rounds']} | {m['original']:.3f} | {m['contracted']:.3f} | "
            f"{r['ratio_contracted_original']:.3f} | {r['ratio_copied_original']:.3f} | "
            f"{len(r['noncontiguous_contracted_params'])} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"onnxruntime": ort.__version__, "rows": rows}, f, indent=1)
    if not all(r["same_graph"] for r in rows):
        for r in rows:
            if not r["same_graph"]:
                extra = collections.Counter(r["op_types_contracted"]) - collections.Counter(r["op_types"])
                print(f"error: {r['model']}: the contracted model's ONNX graph differs from the original's "
                      f"(extra nodes {dict(extra)}; non-contiguous weights: "
                      f"{', '.join(r['noncontiguous_contracted_params'][:4]) or 'none'})", file=sys.stderr)  # fmt: skip
        sys.exit(1)


if __name__ == "__main__":
    main()
