"""Does training expanded change what INT8 costs? SmallNet variants trained on Fashion-MNIST, contracted,
then quantized by ``expandctl quantize``'s library steps; float and INT8 accuracy, drop, latency ratio.

    python benchmarks/int8_drop.py                       # compact, cl, ck, fc, cl+fc, ck+fc; k=7; seeds 0-4
    python benchmarks/int8_drop.py --kernels 3,5,7,9     # more later: finished runs are reused
    python benchmarks/int8_drop.py --calibration entropy # the same trained models, another calibration
    python benchmarks/int8_drop.py --models              # the torchvision runs of examples/figures.py's models

1. Training is examples/reproduce.py's (the results/fashion protocol by default: 12 epochs of the
   paper's schedule on a fixed stratified 10,000-image subset, SGD momentum 0.9, batch 128, rate 4),
   run in-process, one thread, into WORK/train; resumable (a finished run is skipped, a killed one
   continues from its last epoch). The committed run files in results/ hold no weights, hence this.
2. Each contracted model is exported (``export_onnx``, checked against torch) and quantized
   (:func:`expandctl.quantize.quantize`: QDQ, per-channel symmetric int8 weights, ``--calib-size``
   training images stratified by class with ``--calib-seed``), both files scored on the whole
   validation split (10,000 images) and timed interleaved in the same process (onnxruntime CPU, one
   thread, batch 32, 200 rounds). One JSON per run in WORK/int8-METHOD (skipped when present).
3. The table, per run and per variant (mean +- sample std over seeds), goes to
   OUT/int8_drop.{md,json} (minmax) or OUT/int8_drop_METHOD.{md,json}; ``--report-only`` rebuilds it.

With ``--models`` nothing is trained: the finished runs of examples/figures.py's ``models`` experiment
(ShuffleNetV2 x0.5 and MobileNetV2 0.5 on Fashion-MNIST at 48x48, ``FIGURES/models/*.json``) are taken
with the contracted model each left in ``FIGURES/work/models/NAME/contracted.pt`` (gitignored: a run
finished on another machine has none and is listed as missing), calibrated on its 10,000 training
images and scored on the 10,000 test images, both as its training read them; table in
OUT/int8_drop_models.{md,json}.

WORK (default benchmarks/work/int8) is gitignored; OUT (default benchmarks/results) is committed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import expandctl
from expandctl.checkpoint import atomic_write, load_checkpoint
from expandctl.data import load_data
from expandctl.experiments.markdown import update_marked
from expandctl.export import export_onnx
from expandctl.quantize import quantize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import reproduce  # noqa: E402

#: Quantization settings a result depends on: all runs of one WORK share them.
QUANT_KEYS = ("calib_size", "calibration", "calib_seed", "latency_batch", "latency_rounds")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--variants", default="compact,cl,ck,fc,cl+fc,ck+fc")
    ap.add_argument("--kernels", default="7")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--val-subset", type=int, default=2000, help="per-epoch validation images (final: all)")
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--calibration", default="minmax", choices=("minmax", "entropy", "percentile"))
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--latency-batch", type=int, default=32)
    ap.add_argument("--latency-rounds", type=int, default=200)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "int8"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--models", action="store_true", help="quantize figures.py's models runs (no training)")
    ap.add_argument("--figures", default=str(ROOT / "results" / "figures"), help="figures.py's OUT, for --models")
    return ap.parse_args(argv)


def train_runs(args, work: Path) -> list[str]:
    """Train what is missing (reproduce.py's runs and resume); the names of the runs asked for."""
    argv = ["--data", args.data, "--variants", args.variants, "--kernels", args.kernels, "--seeds", args.seeds,
            "--epochs", str(args.epochs), "--train-subset", str(args.train_subset), "--val-subset",
            str(args.val_subset), "--threads", "1", "--out", str(work / "train")]  # fmt: skip
    rargs = reproduce.parse_args(argv)
    reproduce.main(argv)
    return [
        reproduce.Run(v, k, s).name
        for s in rargs.seeds
        for k in rargs.kernels
        for v in rargs.variants
        if reproduce.applicable(v, k)
    ]


def records_dir(work: Path, method: str, models: bool = False) -> Path:
    return work / (f"int8-models-{method}" if models else f"int8-{method}")


def report_stem(method: str, models: bool = False) -> str:
    stem = "int8_drop_models" if models else "int8_drop"
    return stem if method == "minmax" else f"{stem}_{method}"


def quantize_run(name: str, args, work: Path, sets, run: dict | None = None, contracted: Path | None = None) -> dict:
    """Export the run's contracted model, quantize it, return (and store) the record. ``run`` and
    ``contracted``: a figures.py ``models`` run file and its contracted model (else reproduce.py's)."""
    train_dir = work / "train"
    if run is None:
        run = json.loads((train_dir / "runs" / f"{name}.json").read_text())
        contracted = train_dir / "work" / name / "contracted.pt"
    else:
        run = {**run["spec"], "settings": run["settings"], "final_acc": run["final_acc"]}  # spec holds arch
    ckpt = load_checkpoint(contracted)
    qdir = records_dir(work, args.calibration, args.models)
    qdir.mkdir(parents=True, exist_ok=True)
    cpu0 = time.process_time()
    float_path, _ = export_onnx(ckpt.model, qdir / f"{name}.onnx", ckpt.input_shape)
    result = quantize(float_path, qdir / f"{name}.int8.onnx", sets, args.data, calib_size=args.calib_size,
                      method=args.calibration, seed=args.calib_seed, latency_batch=args.latency_batch,
                      latency_rounds=args.latency_rounds)  # fmt: skip
    record = {
        "name": name, "variant": run["variant"], "kernel": run["kernel"], "seed": run["seed"],
        **({"arch": run["arch"]} if args.models else {}),
        "train_settings": run["settings"], "quant_settings": {k: getattr(args, k) for k in QUANT_KEYS},
        "torch_final_acc": run["final_acc"],  # the contracted model in torch (reproduce.py)
        **result.to_dict(),
        "load_average_1min": os.getloadavg()[0],  # the machine is shared: how busy it was
        "cpu_seconds": round(time.process_time() - cpu0, 2),
        "torch": str(torch.__version__), "expandctl": expandctl.__version__, "machine": platform.machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    with atomic_write(qdir / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return record


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def report(work: Path, out: Path, method: str = "minmax", models: bool = False) -> dict:
    records = [json.loads(p.read_text()) for p in sorted(records_dir(work, method, models).glob("*.json"))]
    if not records:
        raise SystemExit(f"no quantized runs in {records_dir(work, method, models)}")
    if models:
        import figures  # the study's variant order: compact, the CL variants, the branch kinds

        order = {v: i for i, v in enumerate((*figures.MODEL_VARIANTS["mobilenet_v2"], *figures.BRANCH_KINDS))}
        records.sort(key=lambda r: (r["arch"], order.get(r["variant"], 99), r["seed"]))
    else:
        order = {v: i for i, v in enumerate(reproduce.VARIANTS)}
        records.sort(key=lambda r: (order.get(r["variant"], 99), r["kernel"], r["seed"]))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["arch"] if models else str(r["kernel"]), r["variant"]), []).append(r)

    def cols(rs):
        f = [100 * r["float_eval"]["accuracy"] for r in rs]
        q = [100 * r["int8_eval"]["accuracy"] for r in rs]
        d = [r["drop_points"] for r in rs]
        lat = [r["latency"]["ratio"] for r in rs]
        lat_min = [r["latency"]["ratio_min"] for r in rs]
        return f, q, d, lat, lat_min

    summary = {}
    first = records[0]
    ts, qs = first["train_settings"], first["quant_settings"]
    if models:
        lines = ["# INT8 drop of the torchvision models (benchmarks/int8_drop.py --models)", "",
                 f"Training: examples/figures.py's `models` experiment on {ts['data']} at {ts['image_size']}x"
                 f"{ts['image_size']} (gray replicated to 3 channels), {ts['epochs']} epochs ({ts['schedule']} "
                 f"schedule from lr {ts['lr']}), {ts['train_subset']} training images (stratified, seed "
                 f"{ts['subset_seed']}), batch {ts['batch_size']}, momentum {ts['momentum']}, rate {ts['rate']}, "
                 "one thread; then contracted (docs/evidence.md)."]  # fmt: skip
        head = "| model | variant | seeds |"
    else:
        lines = ["# INT8 drop of SmallNet variants (benchmarks/int8_drop.py)", "",
                 f"Training: examples/reproduce.py on {ts['data']}, {ts['epochs']} epochs ({ts['schedule']} "
                 f"schedule, lr {ts['lr']}), {ts['train_subset']} training images (stratified, seed "
                 f"{ts['subset_seed']}), batch {ts['batch_size']}, momentum {ts['momentum']}, rate {ts['rate']}, "
                 "one thread; then contracted."]  # fmt: skip
        head = "| variant | k | seeds |"
    lines += [
        f"Quantization: onnxruntime {first['quantization']['onnxruntime']} static, {first['quantization']['format']}, "
        f"weights {first['quantization']['weights']}, activations {first['quantization']['activations']}; "
        f"{qs['calibration']} calibration on {qs['calib_size']} training images (stratified, seed {qs['calib_seed']}).",
        f"Scored on the whole validation split ({first['float_eval']['samples']} images) in onnxruntime. Latency: "
        f"{qs['latency_rounds']} interleaved rounds, batch {qs['latency_batch']}, {first['latency']['threads']} "
        "thread, INT8 / float (below 1: INT8 faster) of the median and of the fastest round, on a shared machine.",
        "",
        f"{head} float acc % | INT8 acc % | drop (points) | latency ratio (medians) | (fastest) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (where, variant), rs in groups.items():
        f, q, d, lat, lat_min = cols(rs)
        key = f"{where}-{variant}" if models else f"{variant}-k{where}"
        summary[key] = {
            "seeds": [r["seed"] for r in rs],
            "float_acc": f, "int8_acc": q, "drop_points": d, "latency_ratio": lat, "latency_ratio_min": lat_min,
            "mean": {"float_acc": statistics.mean(f), "int8_acc": statistics.mean(q), "drop_points": statistics.mean(d),
                     "latency_ratio": statistics.mean(lat), "latency_ratio_min": statistics.mean(lat_min)},
        }  # fmt: skip
        cells = f"| {where} | {variant} |" if models else f"| {variant} | {where} |"
        lines.append(
            f"{cells} {len(rs)} | {mean_std(f)} | {mean_std(q)} | {mean_std(d)} | {mean_std(lat)} "
            f"| {mean_std(lat_min)} |"
        )
    lines += ["", "Every run (latency in ms per batch, median / fastest round):", ""]
    lines += ["| run | float acc % | INT8 acc % | drop | float ms | INT8 ms | float / INT8 bytes | load |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in records:
        lat = r["latency"]
        lines.append(
            f"| {r['name']} | {100 * r['float_eval']['accuracy']:.2f} | {100 * r['int8_eval']['accuracy']:.2f} | "
            f"{r['drop_points']:+.2f} | {lat['float_ms']:.2f} / {lat['float_ms_min']:.2f} | "
            f"{lat['int8_ms']:.2f} / {lat['int8_ms_min']:.2f} | {r['float_bytes']:,} / {r['int8_bytes']:,} | "
            f"{r['load_average_1min']:.1f} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / f"{report_stem(method, models)}.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    slim = [{k: v for k, v in r.items() if k not in ("train_settings", "output")} for r in records]  # no local paths
    with atomic_write(out / f"{report_stem(method, models)}.json") as tmp:
        tmp.write_text(json.dumps({"summary": summary, "train_settings": ts, "runs": slim}, indent=1) + "\n")
    return summary


def readme_table(out: Path) -> str | None:
    """The README's INT8 table (min-max calibration): SmallNet's variants and the torchvision
    models', from the two committed summaries; ``None`` if neither is there."""
    head = "| model | variant | seeds | float acc % | INT8 acc % | drop (points) | INT8 / float time (fastest rounds) |"
    from figures import MODEL_TITLES

    lines = [head, "|---|---|---|---|---|---|---|"]
    for stem in ("int8_drop", "int8_drop_models"):
        path = out / f"{stem}.json"
        if not path.is_file():
            continue
        for key, g in json.loads(path.read_text())["summary"].items():
            if stem == "int8_drop":
                variant, k = key.rsplit("-k", 1)
                model = f"SmallNet {k}x{k}"
            else:
                arch, variant = next((a, key[len(a) + 1 :]) for a in MODEL_TITLES if key.startswith(a + "-"))
                model = MODEL_TITLES[arch]
            cells = [mean_std([float(x) for x in g[f]]) for f in ("float_acc", "int8_acc", "drop_points")]
            lat = mean_std(g["latency_ratio_min"])
            lines.append(f"| {model} | {variant} | {len(g['seeds'])} | {' | '.join(cells)} | {lat} |")
    return "\n".join(lines) if len(lines) > 2 else None


def model_runs(args) -> list[tuple[str, dict, Path | None]]:
    """``(name, run, contracted model or None)`` of every finished figures.py ``models`` run."""
    figures_dir = Path(args.figures)
    runs = [json.loads(p.read_text()) for p in sorted((figures_dir / "models").glob("*.json"))]
    found = []
    for r in runs:
        path = figures_dir / "work" / "models" / r["name"] / "contracted.pt"
        found.append((r["name"], r, path if path.is_file() else None))
    return found


def model_sets(data, run: dict):
    """The run's calibration (its training images) and scoring (all test images) splits, as it read them."""
    import figures

    spec = figures.Spec("models", run["spec"]["variant"], run["spec"]["seed"], arch=run["spec"]["arch"])
    splits = data.for_spec(spec)
    return figures.DataSplits(splits.train, data.full_test(spec), splits.num_classes, splits.input_shape)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    work, out = Path(args.work), Path(args.out)
    qdir = records_dir(work, args.calibration, args.models)
    if not args.report_only:
        if args.models:
            import figures

            todo = [(n, r, c) for n, r, c in model_runs(args) if not (qdir / f"{n}.json").is_file()]
            missing = [n for n, _, c in todo if c is None]
            if missing:
                print(f"no contracted model for {len(missing)} run(s) (trained elsewhere?): {', '.join(missing)}")
            todo = [t for t in todo if t[2] is not None]
            data = figures.load(figures.SETTINGS) if todo else None
            jobs = [
                (n, lambda n=n, r=r, c=c: quantize_run(n, args, work, model_sets(data, r), r, c)) for n, r, c in todo
            ]
        else:
            names = train_runs(args, work)
            sets = load_data(args.data, augment=False)
            jobs = [(n, lambda n=n: quantize_run(n, args, work, sets)) for n in names]
        for name, job in jobs:
            path = qdir / f"{name}.json"
            if path.is_file():
                done = json.loads(path.read_text())["quant_settings"]
                if done != {k: getattr(args, k) for k in QUANT_KEYS}:
                    raise SystemExit(f"{path} was quantized with other settings ({done}); use another --work")
                continue
            t0 = time.perf_counter()
            r = job()
            f, q = 100 * r["float_eval"]["accuracy"], 100 * r["int8_eval"]["accuracy"]
            print(f"{name}: float {f:.2f}%, INT8 {q:.2f}%, drop {r['drop_points']:+.2f}, "
                  f"latency x{r['latency']['ratio']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    summary = report(work, out, args.calibration, args.models)
    if out.resolve() == (ROOT / "benchmarks" / "results").resolve() and args.calibration == "minmax":
        table = readme_table(out)
        if table:
            update_marked(ROOT / "README.md", "int8:table", table)
    print((out / f"{report_stem(args.calibration, args.models)}.md").read_text())
    return summary


if __name__ == "__main__":
    main()
