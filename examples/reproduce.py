"""Reproduce the paper's SmallNet table: train every variant, contract it, evaluate the compact model.

For a data spec, kernel sizes, variants and seeds, each run builds SmallNet(k), expands it (FC only
on the hidden Linear, CK only for k > 3, rate 4), trains it in-process with ``expandctl.train``
(SGD momentum 0.9, batch 128, no weight decay, the paper's lr / lr/10 / lr/100 thirds, fused
forward), contracts it with ``expandctl.contract``, checks the contraction in float64 and evaluates
the *contracted* model on the validation split on its own. KD variants distil from a compact
teacher of the same kernel size trained with another seed (1000 + seed).

    python examples/reproduce.py --data fashion-mnist --kernels 3,5,7,9 --seeds 0,1,2,3,4 \\
        --epochs 15 --train-subset 10000 --out results/fashion
    python examples/reproduce.py --data cifar10:/data --epochs 150 --out results/cifar10   # the paper's recipe

Resumable in pieces (the run bookkeeping of :mod:`expandctl.experiments`, as ``expandctl compare``):
every finished run writes ``OUT/runs/<variant>-k<k>-s<seed>.json`` (atomically) and is skipped next
time; a run killed mid-way continues from its ``last.pt``. Several processes may
share one OUT if they run different seeds or kernels (``--seeds 0,2,4`` and ``--seeds 1,3``). Every
invocation ends by regenerating ``OUT/results.md``, ``OUT/results.json`` and the figures from all the
run files present (``--report-only`` does just that).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import expandctl
from expandctl import CheckFailed, ExpandctlError
from expandctl.checkpoint import atomic_write, save
from expandctl.data import DataSplits, TensorImages, load_data, stratified_subset
from expandctl.experiments.runs import check_settings as check_run_settings
from expandctl.experiments.runs import finish_run, train_contracted
from expandctl.experiments.stats import mean_std, welch_p
from expandctl.models import SmallNet
from expandctl.train import DEVICES, SCHEDULES, Callbacks, TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smallnet import VARIANTS as SMALLNET_VARIANTS  # noqa: E402

#: The parallel-branch strategies (acb, rep, dbb, orepa), read from the registry; trained at their own rate.
BRANCH_KINDS = tuple(k for k, cls in expandctl.EXPANSIONS.items() if issubclass(cls[0], expandctl.layers.BranchedConv))
#: The paper's table, plus distillation from a compact teacher, plus the parallel-branch strategies.
VARIANTS = {
    **SMALLNET_VARIANTS,
    "kd": (None, ()),
    "ck+fc+kd": ("ck+fc", ("classifier.3",)),
    **{k: (k, ()) for k in BRANCH_KINDS},
}
DEFAULT_VARIANTS = "compact,fc,cl,cl+fc,ck,ck+fc"
#: Settings a run's result depends on: all runs in one OUT must share them (OUT/settings.json).
SETTING_KEYS = (
    "data", "epochs", "train_subset", "val_subset", "subset_seed", "lr", "schedule", "batch_size", "momentum", "rate",
    "kd_alpha", "kd_temperature",
)  # fmt: skip
TEACHER_SEED_OFFSET = 1000

#: The paper's CIFAR-10 SmallNet numbers (PAPER.md), for the figure and the comparison.
PAPER_C10 = {
    7: {"compact": (78.63, 0.41), "fc": (78.64, 0.39), "cl": (78.47, 0.20), "cl+fc": (79.11, 0.23),
        "ck": (80.27, 0.24), "ck+fc": (80.31, 0.27), "kd": (79.72, None), "ck+fc+kd": (80.63, None)},
    3: {"compact": (73.32, 0.20), "fc": (73.78, 0.83), "cl": (73.96, 0.30), "cl+fc": (74.45, 0.29)},
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    variant: str
    kernel: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}-k{self.kernel}-s{self.seed}"

    @property
    def uses_teacher(self) -> bool:
        return self.variant.endswith("kd")

    @property
    def is_teacher(self) -> bool:
        return self.variant == "teacher"

    @property
    def train_seed(self) -> int:
        """A teacher gets its own seed: a student of the same seed would start from its very init."""
        return self.seed + TEACHER_SEED_OFFSET if self.is_teacher else self.seed

    @property
    def strategy(self) -> tuple[str | None, tuple[str, ...]]:
        return (None, ()) if self.is_teacher else VARIANTS[self.variant]


def applicable(variant: str, kernel: int) -> bool:
    """CK needs a kernel larger than 3x3 (the paper's "-")."""
    return not ("ck" in variant.split("+") and kernel <= 3)


# --------------------------------------------------------------------------------------------------
# Data: loaded once, optional fixed subsets
# --------------------------------------------------------------------------------------------------
#: ``n`` indices stratified by class, drawn from a generator seeded with ``seed`` (the library's
#: ``--train-subset``): the same images on every machine.
subset_indices = stratified_subset


def fixed_subset(dataset, n: int, seed: int, flag: str):
    if n >= len(dataset):
        raise SystemExit(f"{flag} {n} is not smaller than the set ({len(dataset)} images)")
    if isinstance(dataset, TensorImages):
        idx = subset_indices(dataset.labels, n, seed)
        sub = copy.copy(dataset)
        sub.images, sub.labels = dataset.images[idx], dataset.labels[idx]
        return sub
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.utils.data.Subset(dataset, perm.sort().values.tolist())


def prepare_data(args) -> tuple[DataSplits, DataSplits]:
    """``(full, for_training)``: the data set, and what the loop sees (``--train-subset`` training
    images, ``--val-subset`` images for the per-epoch validation curves). Final accuracies are
    always measured on the full validation split."""
    full = load_data(args.data)
    seen = full
    if args.train_subset:
        seen = seen._replace(train=fixed_subset(full.train, args.train_subset, args.subset_seed, "--train-subset"))
    if args.val_subset:
        seen = seen._replace(val=fixed_subset(full.val, args.val_subset, args.subset_seed, "--val-subset"))
    return full, seen


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------
class Progress(Callbacks):
    def __init__(self, name: str, verbose: bool):
        self.name, self.verbose = name, verbose

    def on_epoch_end(self, metrics, is_best):
        if self.verbose:
            print(f"  {self.name} epoch {metrics['epoch']}: train {metrics['train_acc']:.4f} "
                  f"val {metrics['val_acc']:.4f} ({metrics['seconds']:.1f} s)", flush=True)  # fmt: skip


def model_kwargs(kernel: int, data) -> dict:
    c, h, w = data.input_shape
    if h != w:
        raise SystemExit(f"SmallNet needs square images; this data set has {h}x{w}")
    return {"kernel_size": kernel, "in_channels": c, "num_classes": data.num_classes, "image_size": h}


def teacher_path(out: Path, kernel: int, seed: int) -> Path:
    """The contracted compact teacher of the KD students with this kernel size and seed."""
    return out / "teachers" / f"k{kernel}-s{seed}.pt"


def result_path(out: Path, run: Run) -> Path:
    return out / ("teachers" if run.is_teacher else "runs") / f"{run.name}.json"


def train_one(run: Run, args, data: DataSplits, seen: DataSplits, out: Path, device: torch.device) -> dict:
    """Train (on ``seen``), contract, verify and evaluate (on ``data.val``) ``run``; write its JSON
    (a teacher also its checkpoint)."""
    kwargs = model_kwargs(run.kernel, data)
    strategy, exclude = run.strategy
    work = out / "work" / run.name

    def build():
        torch.manual_seed(run.train_seed)
        model = SmallNet(**kwargs)
        if strategy:
            rate = None if strategy in BRANCH_KINDS else args.rate  # --rate is ExpandNets' (dbb/orepa: 1)
            model = expandctl.expand(model, strategy, rate, exclude=exclude, seed=run.train_seed)
        return model, "smallnet", kwargs, data.input_shape

    teacher = teacher_path(out, run.kernel, run.seed) if run.uses_teacher else None
    config = TrainConfig(
        src="", data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, schedule=args.schedule, weight_decay=0.0, teacher=str(teacher) if teacher else None,
        kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature, forward="fused", device=args.device,
        seed=run.train_seed, command=shlex.join(sys.argv),
    )  # fmt: skip
    try:
        # The result is the contracted model's accuracy, measured independently of the loop.
        t = train_contracted(work, build, config, seen, score_on=data.val, callbacks=Progress(run.name, args.verbose),
                             batch_size=1000, name=run.name)  # fmt: skip
    except CheckFailed as e:
        raise SystemExit(str(e)) from None
    summary, compact = t.summary, t.compact
    history = [{k: m[k] for k in ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")}
               for m in summary["history"]]  # fmt: skip
    result = {
        "name": run.name, "variant": run.variant, "kernel": run.kernel, "seed": run.seed,
        "train_seed": run.train_seed,
        "strategy": strategy, "exclude": list(exclude), "teacher": str(teacher) if teacher else None,
        "settings": settings_of(args),
        "final_acc": t.final["accuracy"],
        "last_epoch_val_acc": history[-1]["val_acc"],  # expanded model, per-epoch validation set
        "best_acc": summary["best_val_acc"], "best_epoch": summary["best_epoch"],
        "train_size": len(seen.train), "val_size_per_epoch": len(seen.val), "val_size": len(data.val),
        "params_trained": t.params_trained, "params_compact": t.params_compact,
        "contraction_max_rel_float64": t.contraction_max_rel,
        "seconds": round(sum(m["seconds"] for m in history), 2),
        "resumed": t.resumed,
        # CPU seconds of this process for the whole run (build, train, contract, check, evaluate):
        # what a run costs on an idle core; "wall_seconds" also counts waiting for a busy one.
        "cpu_seconds": t.cpu_seconds, "wall_seconds": t.wall_seconds,
        "history": history,
        "torch": str(torch.__version__), "expandctl": expandctl.__version__, "threads": torch.get_num_threads(),
        "device": str(device), "machine": platform.machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    if run.is_teacher:
        path = teacher_path(out, run.kernel, run.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save(compact, path, arch="smallnet", arch_kwargs=kwargs, input_shape=data.input_shape,
             extra={"teacher": {k: v for k, v in result.items() if k != "history"}})  # fmt: skip
    else:
        save(compact, work / "contracted.pt", arch="smallnet", arch_kwargs=kwargs, input_shape=data.input_shape)
    finish_run(work, result_path(out, run), result)
    return result


def settings_of(args) -> dict:
    return {k: getattr(args, k) for k in SETTING_KEYS}


def check_settings(out: Path, args) -> None:
    """All runs in one OUT share the settings that shape a result; a mismatch would mix tables."""
    try:
        check_run_settings(out / "settings.json", settings_of(args))
    except ExpandctlError as e:
        raise SystemExit(str(e)) from None


# --------------------------------------------------------------------------------------------------
# Tables and figures, from whatever run files exist
# --------------------------------------------------------------------------------------------------
def fmt(values: Sequence[float]) -> str:
    if not values:
        return "-"
    m, s = mean_std([100 * v for v in values])
    return f"{m:.2f} +- {s:.2f} ({len(values)})"


def collect(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def aggregate(runs: list[dict], metric: str = "final_acc") -> dict:
    cells: dict[str, dict[int, list[float]]] = {}
    for r in runs:
        cells.setdefault(r["variant"], {}).setdefault(r["kernel"], []).append(r[metric])
    return cells


def comparison(cells: dict, variant: str, kernel: int) -> str:
    """Difference to compact, whether mean +- std intervals separate, Welch's t-test p."""
    a, b = cells.get(variant, {}).get(kernel, []), cells.get("compact", {}).get(kernel, [])
    if not a or not b or variant == "compact":
        return "-"
    (ma, sa), (mb, sb) = mean_std([100 * v for v in a]), mean_std([100 * v for v in b])
    separates = abs(ma - mb) > sa + sb
    p = welch_p(a, b)
    return f"{ma - mb:+.2f}{' *' if separates else ''}" + (f" (p={p:.2g})" if p is not None else "")


def write_report(out: Path, args) -> dict:
    runs = collect(out)
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    kernels = sorted({r["kernel"] for r in runs})
    final, best = aggregate(runs, "final_acc"), aggregate(runs, "best_acc")
    seconds = aggregate(runs, "seconds")
    teachers = [json.loads(p.read_text()) for p in sorted((out / "teachers").glob("*.json"))]
    settings = json.loads((out / "settings.json").read_text()) if (out / "settings.json").is_file() else {}

    def table(cells, title, render) -> list[str]:
        lines = [f"**{title}**", "", "| variant | " + " | ".join(f"{k}x{k}" for k in kernels) + " |",
                 "|---|" + "---|" * len(kernels)]  # fmt: skip
        for v in variants:
            lines.append(f"| {v} | " + " | ".join(render(cells, v, k) for k in kernels) + " |")
        return [*lines, ""]

    lines = [
        f"# SmallNet on {settings.get('data', args.data)}: mean +- std over seeds (n)",
        "",
        "Generated by `examples/reproduce.py` from the run files in `runs/`; do not edit by hand.",
        f"Settings: `{json.dumps(settings)}`.",
        f"Runs: {len(runs)}" + (f"; teachers: {len(teachers)}" if teachers else "") + ".",
        "",
        *table(final, "Top-1 accuracy (%) of the contracted model after the last epoch",
               lambda c, v, k: fmt(c.get(v, {}).get(k, []))),
        *table(final, "Difference to compact (points); * where mean +- std intervals do not overlap; "
               "Welch's t-test p", comparison),
        *table(best, "Best per-epoch validation accuracy (%; expanded model, on the per-epoch validation set, "
               "picked on that set itself, so optimistic)", lambda c, v, k: fmt(c.get(v, {}).get(k, []))),
        *table(seconds, "Seconds per run (training + per-epoch validation), mean",
               lambda c, v, k: f"{statistics.fmean(c[v][k]):.1f}" if c.get(v, {}).get(k) else "-"),
    ]  # fmt: skip
    if teachers:
        t = aggregate(teachers, "final_acc")
        lines += ["KD teachers (compact, seed 1000 + student seed): "
                  + ", ".join(f"{k}x{k} {fmt(t[v][k])}" for v in t for k in sorted(t[v])), ""]  # fmt: skip
    with atomic_write(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines))
    summary = {
        "settings": settings,
        "runs": len(runs),
        "cells": {
            v: {str(k): dict(zip(("mean", "std"), mean_std(vals)), n=len(vals), seeds=sorted(
                r["seed"] for r in runs if r["variant"] == v and r["kernel"] == k))
                for k, vals in final[v].items()}
            for v in variants
        },
    }  # fmt: skip
    with atomic_write(out / "results.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    if runs:
        plot(out, runs, variants, kernels, final)
    return summary


def plot(out: Path, runs, variants, kernels, final) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, v in enumerate(variants):
        ks = [k for k in kernels if final[v].get(k)]
        stats = [mean_std([100 * a for a in final[v][k]]) for k in ks]
        x = [k + 0.08 * (i - len(variants) / 2) for k in ks]  # small offsets keep error bars apart
        ax.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=v)
    ax.set(xlabel="kernel size", ylabel="top-1 accuracy (%), contracted", xticks=kernels,
           title="SmallNet: final accuracy, mean +- std over seeds")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(out / "accuracy_vs_kernel.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(kernels), figsize=(4 * len(kernels), 3.6), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], kernels):
        for v in variants:
            curves = [r["history"] for r in runs if r["variant"] == v and r["kernel"] == k]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [statistics.fmean(100 * c[e]["val_acc"] for c in curves) for e in range(n)]
            ax.plot(range(1, n + 1), mean, label=v)
        ax.set(title=f"{k}x{k}", xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy (%), mean over seeds")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(out / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--data", required=True, help="data spec (fashion-mnist, digits, mnist5k, cifar10:DIR, ...)")
    ap.add_argument("--kernels", type=ints, default=[3, 5, 7, 9])
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=150, help="the paper: 150 (50 + 50 + 50)")
    ap.add_argument("--train-subset", type=int, default=None, help="train on N images (stratified, fixed)")
    ap.add_argument("--val-subset", type=int, default=None, help="per-epoch validation on N images (final: all)")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--schedule", default="paper", choices=SCHEDULES)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--rate", type=float, default=4)
    ap.add_argument("--kd-alpha", type=float, default=0.9)
    ap.add_argument("--kd-temperature", type=float, default=4.0)
    ap.add_argument("--device", default="auto", choices=DEVICES)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--report-only", action="store_true", help="only regenerate the tables and figures")
    ap.add_argument("--verbose", action="store_true", help="one line per epoch")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run what is missing, then rewrite the report; returns ``{"ran": [...], "skipped": [...], ...}``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    ran, skipped = [], []
    if not args.report_only:
        check_settings(out, args)
        data, seen = prepare_data(args)
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        plan = [Run(v, k, s) for s in args.seeds for k in args.kernels for v in args.variants if applicable(v, k)]
        print(f"{len(plan)} runs planned in {out}", flush=True)
        for i, run in enumerate(plan, 1):
            if result_path(out, run).is_file():
                skipped.append(run.name)
                continue
            teacher = Run("teacher", run.kernel, run.seed)
            if run.uses_teacher and not result_path(out, teacher).is_file():
                t0 = time.perf_counter()
                r = train_one(teacher, args, data, seen, out, device)
                print(f"{teacher.name}: {100 * r['final_acc']:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
            t0 = time.perf_counter()
            r = train_one(run, args, data, seen, out, device)
            ran.append(run.name)
            print(f"[{i}/{len(plan)}] {run.name}: {100 * r['final_acc']:.2f}% contracted "
                  f"(best {100 * r['best_acc']:.2f}%, {time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    summary = write_report(out, args)
    print(f"ran {len(ran)}, skipped {len(skipped)} finished; {out / 'results.md'}", flush=True)
    return {"ran": ran, "skipped": skipped, **summary}


if __name__ == "__main__":
    main()
