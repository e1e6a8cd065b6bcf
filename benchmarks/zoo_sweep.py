"""Whole-zoo sweep: every timm architecture and torchvision's classification, segmentation and
detection models, built without weights, expanded with each of ``--strategies`` (default
``ck+cl+fc`` at rate 2; any other strategy, e.g. the branch kinds ``acb``, ``rep``, ``dbb``,
``orepa``, at its kinds' default rate), contracted, and compared in float64 against the expanded
model running its chains or branches explicitly.

Per model (in a worker process that is replaced after a crash, a timeout or ``--per-worker``
models, so a crash or a memory blow-up costs one model):

1. build it on the meta device to count parameters; above ``--max-params`` it is recorded as
   ``skipped`` (its expanded float64 copies would not fit in memory), not dropped;
2. build it for real (random init, all-zero conv / linear weights such as timm's zero-initialised
   heads re-initialised, random BatchNorm statistics, eval mode, float64) and find a
   small input it accepts (64 px first, then larger) -- once for all the strategies;
3. per strategy: ``plan`` / ``expand`` (seed 0) / random running statistics and affines for the
   BatchNorms inside the expanded layers and random per-channel scales (so that folding them is
   checked away from the defaults) / ``contract``, then ``verify.check_contraction`` in float64
   (1 sample, batch 1): the contracted model against the expanded one run explicitly, plus the
   linear-part check of fused-only layers; whether the contracted model has the original's
   module types, and how many bias-free convs gained a bias (no BatchNorm follows them);
4. for ``ck+cl+fc``, on a sample (1 model in ``--preserve-every``, by a hash of its name),
   ``init="preserve"`` with ``cl+fc`` at rate 2 (the exact construction) against the original.

Results go to one JSON-lines file per strategy (``--out`` for ``ck+cl+fc``, ``<out>_<strategy>``
beside it for the others), one line per model: status (``exact``, ``inexact``, ``failed``,
``skipped``, ``nothing`` when no layer is selected), expanded / candidate layers, the worst
relative error, seconds, the stage and reason of a failure, and the reasons layers were left
alone. The files are the resume point: a rerun runs each model for the strategies whose file lacks it.

    python benchmarks/zoo_sweep.py [--workers 2] [--out benchmarks/results/zoo_sweep.jsonl]
                                   [--strategies acb,rep,dbb,orepa] [--order size]
                                   [--models resnet18,timm:vit_*] [--limit 10] [--max-params 40e6]
    python benchmarks/zoo_sweep.py --summary --write-docs   # the markdown summary, into README.md and docs/zoo.md

Run it under ``nice``: it takes hours of CPU for the whole zoo.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fnmatch
import json
import math
import multiprocessing as mp
import os
import re
import sys
import time
import traceback
import warnings
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "zoo_sweep.jsonl"
STRATEGY, RATE = "ck+cl+fc", 2
PRESERVE_STRATEGY = "cl+fc"
SIZES = (64, 128, 224, 299)
#: Default parameter bound: an expanded float64 model at rate 2 holds up to ~8x the parameters
#: (fc: m -> 2m -> 2n -> n) at 8 bytes each, and the check keeps ~3 expanded and ~3 compact copies.
MAX_PARAMS = 40_000_000


# --------------------------------------------------------------------------------------------------
# Model lists and construction
# --------------------------------------------------------------------------------------------------
def all_models() -> list[str]:
    """``source:name`` for every model, in sweep order: torchvision's segmentation and detection
    models, then all the others in the order of a hash of their names, so that a partial sweep is
    a sample of every family rather than the alphabetical first few."""
    import timm
    import torchvision.models as tvm

    names = [f"timm:{n}" for n in timm.list_models()]
    for source, module in (("tv", tvm), ("tvseg", tvm.segmentation), ("tvdet", tvm.detection)):
        names += [f"{source}:{n}" for n in tvm.list_models(module=module)]
    first = [n for n in names if n.startswith(("tvseg:", "tvdet:"))]
    rest = sorted((n for n in names if n not in first), key=lambda n: zlib.crc32(n.encode()))
    return first + rest


def _timm_build(name: str, device: str, native_size: bool = False):
    import timm

    last = None
    options = ({"num_classes": 10, "img_size": 64}, {"num_classes": 10}, {})
    for kwargs in options[1:] if native_size else options:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return timm.create_model(name, pretrained=False, device=device, **kwargs), kwargs
        except Exception as e:  # an architecture that does not take these arguments: try fewer
            last = e
    raise last


def _tv_build(source: str, name: str, device: str):
    import torch
    import torchvision.models as tvm

    kwargs = {"weights": None}
    if source == "tv":
        kwargs["num_classes"] = 10
        if name.startswith("vit_"):  # 4 x 4 patches: 64 px for vit_b_16, 56 px for vit_h_14
            kwargs["image_size"] = 4 * int(name.rsplit("_", 1)[1])
    elif source == "tvseg":
        kwargs.update(num_classes=5, weights_backbone=None)
    else:
        kwargs.update(num_classes=5, weights_backbone=None)
        if "rcnn" in name or "retinanet" in name or "fcos" in name:
            kwargs.update(min_size=128, max_size=128)
    with torch.device(device):
        return tvm.get_model(name, **kwargs), {k: v for k, v in kwargs.items() if k != "weights"}


def build(model_id: str, device: str = "cpu", native_size: bool = False):
    """``(model, kwargs)``; timm models are built for 64 px inputs where they take ``img_size``,
    or at their own size with ``native_size``."""
    source, name = model_id.split(":", 1)
    if source == "timm":
        return _timm_build(name, device, native_size)
    return _tv_build(source, name, device)


def count_params(model_id: str) -> int | None:
    """Parameters, counted on the meta device (no memory); ``None`` if it cannot build there."""
    try:
        model, _ = build(model_id, "meta")
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------
def _reason(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}"


def _input_shape(model, model_id: str):
    import torch

    source = model_id.split(":", 1)[0]
    sizes = (300, 320) if model_id.startswith("tvdet:ssd") else SIZES
    native = getattr(model, "pretrained_cfg", {}).get("input_size")  # timm: the size it was made for
    if native and native[0] == 3 and native[1] == native[2] and native[1] not in sizes:
        sizes = (*sizes[:2], native[1], *sizes[2:])
    if isinstance(getattr(model, "image_size", None), int):  # torchvision's ViT: the size it was built for
        sizes = (model.image_size, *sizes)
    last = None
    for s in sizes:
        shape = [3, s, s]
        try:
            with torch.no_grad():
                model(torch.randn(1, *shape, dtype=torch.float64))
            return shape
        except Exception as e:
            last = e
            if source == "tvdet":
                break
    raise last


def _kernel_error(model, expanded) -> float:
    """Worst relative difference between an expanded layer's composed kernel and the weight of the
    layer it replaced (``init="preserve"`` makes them equal up to rounding)."""
    import torch

    import expandctl

    original = dict(model.named_modules())
    worst = 0.0
    with torch.no_grad():
        for path, layer in expandctl.expanded_layers(expanded):
            w = original[path].weight
            worst = max(worst, ((layer.equivalent()[0] - w).abs().max() / w.abs().max()).item())
    return worst


def _noise_floor(model, shape, eps: float = 1e-15, every_tensor: bool = False) -> float:
    """How far ``model``'s float64 output moves, measured as the contraction check measures (same
    input, every output, worst relative error), when every conv / linear weight is multiplied by
    ``1 + eps * N(0, 1)``: what a perturbation of float64 rounding size does to this network
    (randomly initialised networks with random BatchNorm statistics can amplify it a millionfold).
    With ``every_tensor``, every floating parameter and buffer (biases, BatchNorm statistics) is
    perturbed: contraction of the branch kinds also rounds the biases and moves running means."""
    import copy

    import torch

    from expandctl.verify import compare_models

    g = torch.Generator().manual_seed(1)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        if every_tensor:
            tensors = [*noisy.parameters(), *(b for b in noisy.buffers() if b.is_floating_point())]
        else:
            tensors = [
                m.weight for m in noisy.modules() if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))
            ]
        for t in tensors:
            t.mul_(1 + eps * torch.randn(t.shape, dtype=t.dtype, generator=g))
    return compare_models(model, noisy, shape, dtype=torch.float64, samples=1, batch=1).max_rel


def _layer_error(big, shape) -> float:
    """Worst relative error, over the expanded layers, of each layer's own contraction against its
    chains or branches run explicitly, on the input the layer sees in the model (a random one of
    ``shape``): whether an inexact model's layers are exact and only the network amplifies their
    rounding. (A layer's merged bias is compared before it moves into a following BatchNorm.)"""
    import torch

    import expandctl

    layers = list(expandctl.expanded_layers(big))
    seen: dict[str, torch.Tensor] = {}

    def keep(path):
        def hook(module, args):  # returns None: a value returned here would replace the layer's input
            seen.setdefault(path, args[0])  # the first call's (a shared head runs once per level)

        return hook

    handles = [layer.register_forward_pre_hook(keep(path)) for path, layer in layers]
    modes = {path: layer.forward_mode for path, layer in layers}
    expandctl.set_forward(big, "explicit")
    worst = 0.0
    try:
        with torch.no_grad():
            big(torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
            for path, layer in layers:
                if path in seen:
                    ref, got = layer(seen[path]), layer.contract()(seen[path])
                    worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    finally:
        for h in handles:
            h.remove()
        for path, layer in layers:
            layer.set_forward(modes[path])
    return worst


def rate_for(strategy: str) -> float | None:
    """The chains' sweep keeps its rate 2; every other strategy runs at its kinds' own defaults."""
    return RATE if strategy == STRATEGY else None


def results_file(out: Path, strategy: str) -> Path:
    """``--out`` holds the ``ck+cl+fc`` results; another strategy's sit beside it, named after it."""
    return out if strategy == STRATEGY else out.with_name(f"{out.stem}_{strategy}{out.suffix}")


@contextlib.contextmanager
def _stages(rec: dict):
    """``mark(stage)`` starts timing ``stage``; on exit ``rec`` has the seconds of each and in all,
    and an exception is recorded as a failure at the stage it happened in."""
    t0 = time.time()
    state = {"stage": "", "t": t0}
    times = rec.setdefault("stage_seconds", {})

    def mark(stage):
        now = time.time()
        if state["stage"]:
            times[state["stage"]] = round(times.get(state["stage"], 0.0) + now - state["t"], 2)
        state.update(stage=stage, t=now)

    try:
        yield mark
    except Exception as e:
        rec.update(status="failed", stage=state["stage"], reason=_reason(e), trace=traceback.format_exc()[-2000:])
    finally:
        mark("")
        rec["seconds"] = round(rec.get("seconds", 0.0) + time.time() - t0, 2)


#: Below this, a model's output hardly depends on its input (a zero-initialised head; a random
#: network whose BatchNorm shifts drown the signal): its check sees the kernels only through the
#: constant paths, and the summary says so.
BLIND = 1e-6


def _input_sensitivity(model, shape) -> float | None:
    """Worst relative change of any output between two random inputs: ``max|f(x1) - f(x2)| /
    max|f(x1)|`` (0 when the output is identically zero)."""
    import torch

    from expandctl.verify import output_leaves

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        a, b = (output_leaves(model(torch.randn(1, *shape, dtype=torch.float64, generator=g))) for _ in range(2))
    worst = 0.0
    for (_, u), (_, v) in zip(a, b, strict=False):
        if u.shape != v.shape:
            return 1.0
        if not u.is_floating_point():
            continue
        scale, diff = u.abs().max().item(), (u - v).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else (math.inf if diff > 0 else 0.0))
    return worst


def _reset_zero_weights(model) -> list[str]:
    """Give every conv / linear layer whose weight is all zero (timm's zero-initialised classifier
    heads: MLP-Mixer, gMLP, ...) its default random initialisation; returns their paths. Otherwise
    the output is identically zero and the check compares zeros."""
    import torch

    reset = []
    for path, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and not m.weight.any():
            m.reset_parameters()
            reset.append(path)
    return reset


def prepare(model_id: str, max_params: int) -> tuple[object | None, dict]:
    """``(model, rec)``: the model built in float64 with random BatchNorm statistics and the input
    it accepts in ``rec["input"]``; ``None`` when it is over the bound (``rec`` says ``skipped``) or
    fails to build or run (``rec`` says ``failed``, with the stage)."""
    import torch
    from helpers import randomize_batchnorm

    rec: dict = {"model": model_id}
    model = None
    with _stages(rec) as mark:
        mark("build")
        params = count_params(model_id)
        rec["params"] = params
        if params is not None and params > max_params:
            rec.update(status="skipped", reason=f"{params / 1e6:.1f}M parameters > bound {max_params / 1e6:g}M")
            return None, rec
        torch.manual_seed(0)
        model, kwargs = build(model_id)
        rec["kwargs"] = kwargs
        rec["params"] = sum(p.numel() for p in model.parameters())
        if rec["params"] > max_params:
            rec.update(status="skipped", reason=f"{rec['params'] / 1e6:.1f}M parameters > bound {max_params / 1e6:g}M")
            return None, rec
        torch.manual_seed(0)
        rec["zero_weights_reset"] = _reset_zero_weights(model)
        model = randomize_batchnorm(model).double().eval()
        mark("forward")
        try:
            shape = _input_shape(model, model_id)
        except Exception:
            if "img_size" not in kwargs:
                raise
            # built for 64 px but does not run there (a window or block size that 64 px does not
            # divide, a token grid it rounds differently): its own input size, then the others
            torch.manual_seed(0)
            model, kwargs = build(model_id, native_size=True)
            rec["kwargs"] = kwargs
            torch.manual_seed(0)
            rec["zero_weights_reset"] = _reset_zero_weights(model)
            model = randomize_batchnorm(model).double().eval()
            shape = _input_shape(model, model_id)
        rec["input"] = shape
        try:
            rec["input_sensitivity"] = _input_sensitivity(model, shape)
        except Exception:  # a model whose outputs cannot be compared this way: not measured
            rec["input_sensitivity"] = None
    if rec.get("status") == "failed":
        return None, rec
    return model, rec


def randomize_expanded(big, seed: int = 0) -> None:
    """Random running statistics and affines for every BatchNorm inside an expanded layer (the
    branch kinds' per-branch ones, OREPA's after the sum) and random per-channel scales (OREPA's),
    so that contraction's folding of them is checked away from the default (0, 1) statistics."""
    import torch
    from helpers import randomize_batchnorm

    import expandctl

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (_, layer) in enumerate(expandctl.expanded_layers(big)):
            randomize_batchnorm(layer, seed=seed + 1 + i)
            for name, p in layer.named_parameters():
                if name.rsplit(".", 1)[-1] == "scale":
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def _bias_added(model, small) -> int:
    """Convolutions that had no bias and have one after contraction (no BatchNorm followed them to
    take the branches' folded shift): the same module type, one more parameter vector."""
    import torch.nn as nn

    before = dict(model.named_modules())
    return sum(
        1
        for path, m in small.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd)
        and m.bias is not None
        and path in before
        and getattr(before[path], "bias", 0) is None
    )


def run_strategy(model, base: dict, strategy: str, preserve_every: int) -> dict:
    """One strategy on a prepared model: plan / expand (seed 0) / randomise the expanded layers'
    BatchNorms and scales / contract / check in float64 against the explicit branches or chains."""
    import torch

    import expandctl
    from expandctl.verify import check_contraction, compare_models

    model_id, shape = base["model"], base["input"]
    rate = rate_for(strategy)
    rec = {k: v for k, v in base.items() if k not in ("seconds", "stage_seconds")}
    rec.update(strategy=strategy, rate=rate, stage_seconds=dict(base.get("stage_seconds", {})))
    rec["seconds"] = base.get("seconds", 0.0)
    with _stages(rec) as mark:
        mark("plan")
        plan = expandctl.plan(model, strategy=strategy, rate=rate)
        rec["candidates"] = len(plan.entries)
        rec["expanded"] = len(plan.expanded)
        rec["fused_only"] = sum(e.note is not None for e in plan.expanded)
        rec["left_alone"] = dict(collections.Counter(e.reason for e in plan if e.kind is None))
        if not plan.expanded:
            rec["status"] = "nothing"
            return rec
        mark("expand")
        big = expandctl.expand(model, strategy=strategy, rate=rate, seed=0)
        mark("randomize")
        randomize_expanded(big)
        mark("contract")
        small = expandctl.contract(big)
        same = [type(m) for m in small.modules()] == [type(m) for m in model.modules()]
        rec["same_types"] = same
        rec["bias_added"] = _bias_added(model, small)
        mark("compare")
        (report,) = check_contraction(big, small, shape, dtypes=(torch.float64,), samples=1, batch=1)
        rec["max_rel"] = report.max_rel if math.isfinite(report.max_rel) else None
        rec["status"] = "exact" if report.passed and same else "inexact"
        if not report.passed:
            rec["reason"] = "; ".join(
                f"{o.name}: {o.reason or f'{o.max_rel:.3g}'}" for o in report.outputs if not o.passed
            )
            # what float64 rounding of its weights alone does to the contracted model's output
            rec["noise_floor"] = _noise_floor(small, shape)
            # and of every tensor (biases and BatchNorm statistics too) by 1e-16, under float64's eps
            rec["noise_floor_all"] = _noise_floor(small, shape, 1e-16, every_tensor=True)
            try:  # a diagnosis: if it cannot run, the record keeps its status and says why
                rec["layer_max_rel"] = _layer_error(big, shape)
            except Exception as e:
                rec["layer_error_failed"] = _reason(e)
        elif not same:
            rec["reason"] = "contracted model's module types differ from the original's"
        del big, small
        if strategy == STRATEGY and preserve_every and zlib.crc32(model_id.encode()) % preserve_every == 0:
            mark("preserve")
            try:
                kept = expandctl.expand(model, strategy=PRESERVE_STRATEGY, rate=RATE, init="preserve", seed=0)
                rep = compare_models(model, kept, shape, dtype=torch.float64, samples=1, batch=1)
                rec["preserve_max_rel"] = rep.max_rel if math.isfinite(rep.max_rel) else None
                rec["preserve_passed"] = rep.passed
                rec["preserve_kernel_max_rel"] = _kernel_error(model, kept)
                if not rep.passed:  # how far the model itself moves under float64 rounding of its weights
                    rec["preserve_noise_floor"] = _noise_floor(model, shape)
            except expandctl.NothingToExpandError:
                rec["preserve_passed"] = None
    return rec


def run_one(model_id: str, strategies: list[str], max_params: int, preserve_every: int):
    """Yield one record per strategy: the model is built and its input found once, then each
    strategy runs on it in turn (a model that is skipped or fails to build gives each the same)."""
    import torch

    torch.set_num_threads(1)
    if str(HERE.parent / "tests") not in sys.path:
        sys.path.insert(0, str(HERE.parent / "tests"))
    model, base = prepare(model_id, max_params)
    for strategy in strategies:
        if model is None:
            yield strategy, {**base, "strategy": strategy, "rate": rate_for(strategy)}
        else:
            yield strategy, run_strategy(model, base, strategy, preserve_every)


def serve(conn, records) -> None:
    """The worker protocol: imports once, then runs the models the parent sends, one at a time, until
    it is sent ``None`` (or killed: a crash, a memory blow-up or a timeout costs one model). A job is
    ``(model id, names)``; ``records(model_id, names)`` yields ``(name, record)``, each sent as it is
    done, then ``None``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")
    import gc

    while True:
        job = conn.recv()
        if job is None:
            break
        for name, rec in records(*job):
            conn.send((name, rec))
            gc.collect()
        conn.send(None)
    conn.close()


def _worker(max_params, preserve_every, conn):
    """A worker process for the expansion sweep: each strategy's record of each model (:func:`serve`)."""
    serve(conn, lambda model_id, strategies: run_one(model_id, strategies, max_params, preserve_every))


# --------------------------------------------------------------------------------------------------
# The sweep: a few worker processes, one model at a time each, results appended as they come
# --------------------------------------------------------------------------------------------------
def done_models(out: Path) -> set[str]:
    if not out.exists():
        return set()
    return {json.loads(line)["model"] for line in out.read_text().splitlines() if line.strip()}


def read_records(out: Path) -> list[dict]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def order_by_size(models: list[str], out: Path, log=None) -> list[str]:
    """``models`` smallest first, by the parameter counts the results files already hold (any
    strategy's), else counted on the meta device; a model that cannot be counted goes last."""
    known: dict[str, int] = {}
    for path in [out, *sorted(out.parent.glob(f"{out.stem}_*{out.suffix}"))]:
        for r in read_records(path):
            if r.get("params") is not None:
                known.setdefault(r["model"], r["params"])
    missing = [m for m in models if m not in known]
    if missing and log:
        log(f"counting the parameters of {len(missing)} models on the meta device")
    for m in missing:
        n = count_params(m)
        known[m] = n if n is not None else math.inf
    return sorted(models, key=lambda m: known[m])


class _Slot:
    """One worker process and the model it is running. A worker is replaced after ``per_worker``
    models (memory a model leaves behind stays bounded) and whenever it dies or times out."""

    def __init__(self, ctx, max_params, preserve_every, worker=None):
        self.conn, child = ctx.Pipe()
        target = worker or _worker
        self.proc = ctx.Process(target=target, args=(max_params, preserve_every, child), daemon=True)
        self.proc.start()
        child.close()
        self.model, self.pending, self.t0, self.done = None, [], 0.0, 0

    def send(self, model_id, strategies):
        self.model, self.pending, self.t0 = model_id, list(strategies), time.time()
        self.conn.send((model_id, list(strategies)))

    def stop(self, kill=False):
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                self.proc.kill()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def sweep(
    models: list[str],
    out: Path,
    workers: int,
    max_params: int,
    preserve_every: int,
    timeout: float,
    log,
    per_worker: int = 25,
    strategies: tuple[str, ...] = (STRATEGY,),
    worker=None,
):
    """Run every model in ``models`` that some strategy's results file lacks, with the strategies
    that lack it; each record is appended to its strategy's file as it comes. ``timeout`` bounds
    the seconds of one strategy on one model (building it included for the first). ``worker``
    replaces :func:`_worker` (another benchmark's per-model work, called with ``(max_params,
    preserve_every, conn)`` and the same messages; it must be importable by a spawned process)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    files = {s: results_file(out, s) for s in strategies}
    done = {s: done_models(files[s]) for s in strategies}
    todo = [(m, [s for s in strategies if m not in done[s]]) for m in models]
    todo = [(m, ss) for m, ss in todo if ss]
    log(
        f"{len(models)} models x {len(strategies)} strategies ({', '.join(strategies)}): "
        f"{len(models) - len(todo)} done in {', '.join(str(f) for f in files.values())}, {len(todo)} to run"
    )
    ctx = mp.get_context("spawn")
    slots: list[_Slot] = []
    handles = {s: files[s].open("a") for s in strategies}

    def write(strategy, rec):
        f = handles[strategy]
        f.write(json.dumps(rec) + "\n")
        f.flush()
        err = rec.get("max_rel")
        log(
            f"{strategy:9s} {rec['status']:8s} {rec['model']} {rec.get('expanded', '-')}/{rec.get('candidates', '-')} "
            f"err {err if err is None else f'{err:.2g}'} {rec.get('seconds', 0):.1f}s {rec.get('reason', '')[:120]}"
        )

    try:
        while todo or any(s.model for s in slots):
            for i in range(workers):
                if i >= len(slots):
                    slots.append(_Slot(ctx, max_params, preserve_every, worker))
                if slots[i].model is None and todo:
                    if not slots[i].proc.is_alive():
                        slots[i].stop(kill=True)
                        slots[i] = _Slot(ctx, max_params, preserve_every, worker)
                    slots[i].send(*todo.pop(0))
            time.sleep(0.2)
            for i, slot in enumerate(slots):
                if slot.model is None:
                    continue
                finished, failure = False, None
                while slot.conn.poll():
                    try:
                        msg = slot.conn.recv()
                    except EOFError:
                        break
                    if msg is None:
                        finished = True
                        break
                    strategy, rec = msg
                    write(strategy, rec)
                    slot.pending.remove(strategy)
                    slot.t0 = time.time()
                if not finished:
                    if not slot.proc.is_alive():
                        slot.proc.join(5)
                        failure = {"stage": "process", "reason": f"exit code {slot.proc.exitcode}"}
                    elif time.time() - slot.t0 > timeout:
                        slot.stop(kill=True)
                        failure = {"stage": "timeout", "reason": f"over {timeout:g} s"}
                    else:
                        continue
                    # the strategy that was running and the ones after it: the same failure each
                    for strategy in slot.pending:
                        rec = {"model": slot.model, "status": "failed", **failure, "strategy": strategy}
                        rec["seconds"] = round(time.time() - slot.t0, 2)
                        write(strategy, rec)
                slot.model, slot.pending, slot.done = None, [], slot.done + 1
                if failure or slot.done >= per_worker:
                    slot.stop(kill=failure is not None)
                    slots[i] = _Slot(ctx, max_params, preserve_every, worker)
    finally:
        for slot in slots:
            slot.stop()
        for f in handles.values():
            f.close()


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------
def _group(reason: str) -> str:
    """Failure reasons without the model-specific numbers, so that the same cause groups."""
    return re.sub(r"\d+", "N", reason or "")[:160]


def _family(model_id: str) -> str:
    """A model's architecture family: the timm module that defines it (``vision_transformer``), or
    for torchvision the builder name without its size suffix (``resnet``, ``vit``)."""
    source, name = model_id.split(":", 1)
    if source == "timm":
        from timm.models import _registry

        return "timm:" + _registry._model_to_module.get(name, name)
    return f"{source}:" + re.split(r"[_\d]", name, maxsplit=1)[0]


def summary(out: Path, total: int | None) -> str:
    recs = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    by = collections.Counter(r["status"] for r in recs)
    ran = [r for r in recs if r["status"] in ("exact", "inexact")]
    exact = [r for r in ran if r["status"] == "exact" and r.get("max_rel") is not None]
    worst = max(exact, key=lambda r: r["max_rel"], default=None)
    built = len(recs) - by["skipped"] - sum(1 for r in recs if r["status"] == "failed" and r.get("stage") == "build")
    lines = [
        f"Models covered: {len(recs)}" + (f" of {total}" if total else "") + " (the results file is resumable).",
        "",
        "| status | models |",
        "|---|---|",
    ]
    lines += [f"| {s} | {by[s]} |" for s in ("exact", "inexact", "failed", "nothing", "skipped") if by[s]]
    exact_share = by["exact"] / built if built else float("nan")
    lines += [
        "",
        f"Built and run: {built}; exact: {by['exact']} ({100 * exact_share:.1f}% of those built).",
    ]
    if worst:
        lines.append(f"Worst float64 relative error of an exact model: {worst['max_rel']:.3g} ({worst['model']}).")
    layers = sum(r.get("expanded", 0) for r in ran)
    candidates = sum(r.get("candidates", 0) for r in ran)
    fused = sum(r.get("fused_only", 0) for r in ran)
    lines.append(f"Layers expanded: {layers} of {candidates} candidates ({fused} of them fused-only subclasses).")
    pres = [r for r in recs if "preserve_passed" in r and r["preserve_passed"] is not None]
    if pres:
        pw = max((r["preserve_max_rel"] or 0) for r in pres)
        ok = sum(bool(r["preserve_passed"]) for r in pres)
        lines.append(
            f'`init="preserve"` ({PRESERVE_STRATEGY}) on a sample: {ok} of {len(pres)} equal to the original '
            f"within the float64 tolerance (worst relative error {pw:.3g})."
        )
        kern = [r["preserve_kernel_max_rel"] for r in pres if r.get("preserve_kernel_max_rel") is not None]
        if kern:
            lines[-1] += (
                f" Composed kernels against the original weights, worst: {max(kern):.3g} "
                f"(in the {len(kern)} records that have it)."
            )
        for r in pres:
            if not r["preserve_passed"]:
                floor = r.get("preserve_noise_floor")
                lines.append(
                    f"- {r['model']}: output off by {r['preserve_max_rel']:.3g}, composed kernels by "
                    f"{r.get('preserve_kernel_max_rel', float('nan')):.3g}; "
                    + (
                        f"the same model moves by {floor:.3g} when its weights get 1e-15 relative noise"
                        if floor is not None
                        else "noise floor not measured"
                    )
                )
    for r in recs:
        if r["status"] == "inexact" and r.get("noise_floor") is not None:
            lines.append(
                f"- {r['model']} (inexact): off by {r['max_rel']:.3g}; the contracted model itself moves by "
                f"{r['noise_floor']:.3g} when its weights get 1e-15 relative noise"
            )
    for status in ("inexact", "failed", "nothing"):
        group = collections.defaultdict(list)
        for r in recs:
            if r["status"] == status:
                key = (
                    f"{r.get('stage', '')}: {_group(r.get('reason', ''))}"
                    if status == "failed"
                    else _group(r.get("reason", ""))
                )
                group[key].append(r["model"])
        if group:
            lines += ["", f"{status.capitalize()}, grouped by reason:", ""]
            for key, ms in sorted(group.items(), key=lambda kv: -len(kv[1])):
                shown = ", ".join(m.split(":", 1)[1] for m in ms[:6]) + (", ..." if len(ms) > 6 else "")
                lines.append(f"- {len(ms)} x `{key or 'no layer selected'}`: {shown}")
    skipped = [r["model"] for r in recs if r["status"] == "skipped"]
    if skipped:
        families = {m: _family(m) for m in skipped}
        covered = {_family(r["model"]) for r in recs if r["status"] == "exact"}
        with_smaller = [m for m in skipped if families[m] in covered]
        lines += [
            "",
            f"Skipped above the parameter bound: {len(skipped)} models from {len(set(families.values()))} "
            f"architecture families (timm's model file; torchvision's builder); {len(with_smaller)} of them "
            f"belong to a family of which a smaller model is in the sweep and exact "
            f"({len(set(families[m] for m in with_smaller))} families).",
        ]
    left = collections.Counter()
    for r in ran:
        for reason, n in r.get("left_alone", {}).items():
            left[reason] += n
    if left:
        lines += ["", "Layers left alone, by the plan's reason:", ""]
        lines += [f"- {n} x {reason}" for reason, n in left.most_common()]
    return "\n".join(lines)


STATUSES = ("exact", "inexact", "failed", "nothing", "skipped")


def _within_floor(r: dict) -> bool:
    """An inexact model whose error is no larger than what rounding-sized noise does to its
    contracted model's output (1e-15 relative on its weights, or 1e-16 on every tensor): the check
    cannot tell it from rounding."""
    floors = [f for f in (r.get("noise_floor"), r.get("noise_floor_all")) if f is not None]
    return r["status"] == "inexact" and bool(floors) and r.get("max_rel") is not None and r["max_rel"] <= max(floors)


def strategy_table(out: Path, strategies: list[str], total: int | None, top: int = 3) -> str:
    """Markdown: one row per strategy (models covered, built, each status, the share of built
    models with a layer expanded that are exact, and that are exact or inexact within the rounding
    floor (:func:`_within_floor`), the worst float64 error of an exact one, how many
    contracted models keep the original's module types, and how many bias-free convs gained a
    bias), then each strategy's most frequent refusal reasons and its inexact or failed models."""
    rows = [
        "| strategy | models | built | exact | inexact | failed | nothing | skipped | exact / built with a layer "
        "expanded | exact or within the floor | worst error (exact) | same types | convs given a bias |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    refusals, failures = [], []
    for strategy in strategies:
        recs = read_records(results_file(out, strategy))
        by = collections.Counter(r["status"] for r in recs)
        built = len(recs) - by["skipped"] - sum(r["status"] == "failed" and r.get("stage") == "build" for r in recs)
        expanded = built - by["nothing"]
        exact = [r for r in recs if r["status"] == "exact" and r.get("max_rel") is not None]
        worst = max((r["max_rel"] for r in exact), default=None)
        typed = [r for r in recs if "same_types" in r]
        same = f"{sum(r['same_types'] for r in typed)} of {len(typed)}" if typed else "-"
        biased = [r for r in recs if "bias_added" in r]
        bias = (
            f"{sum(r['bias_added'] for r in biased)} in {sum(r['bias_added'] > 0 for r in biased)} models"
            if biased
            else "-"
        )
        share = f"{100 * by['exact'] / expanded:.1f}%" if expanded else "-"
        floor_share = f"{100 * (by['exact'] + sum(map(_within_floor, recs))) / expanded:.1f}%" if expanded else "-"
        covered = f"{len(recs)}" + (f" of {total}" if total else "")
        inexact = str(by["inexact"])
        measured = [r for r in recs if r["status"] == "inexact" and r.get("noise_floor") is not None]
        if measured:
            inexact += f" ({sum(map(_within_floor, measured))} of {len(measured)} measured within the floor)"
        counts = [str(by["exact"]), inexact, *(str(by[s]) for s in STATUSES[2:])]
        rows.append(
            f"| `{strategy}` | {covered} | {built} | "
            + " | ".join(counts)
            + f" | {share} | {floor_share} | {'-' if worst is None else f'{worst:.2g}'} | {same} | {bias} |"
        )
        left = collections.Counter()
        for r in recs:
            for reason, n in r.get("left_alone", {}).items():
                left[reason] += n
        if left:
            shown = "; ".join(f"{n} x {reason}" for reason, n in left.most_common(top))
            refusals.append(f"- `{strategy}` ({sum(left.values())} layers): {shown}")
        for r in recs:
            if r["status"] in ("inexact", "failed"):
                where = f" at {r['stage']}" if r.get("stage") else ""
                line = f"- `{strategy}` {r['status']}{where}: {r['model']}: {r.get('reason', '')[:300]}"
                if r.get("noise_floor_all") is not None:
                    line += (
                        f" (the contracted model's output moves by {r.get('noise_floor', math.nan):.2g} under 1e-15 "
                        f"relative noise on its weights, by {r['noise_floor_all']:.2g} under 1e-16 on every tensor"
                    )
                    if r.get("layer_max_rel") is not None:
                        line += f"; its expanded layers, each on its own input, are off by {r['layer_max_rel']:.2g}"
                    line += ")"
                failures.append(line)
    blind_lines = []
    for strategy in strategies:
        recs = [r for r in read_records(results_file(out, strategy)) if r["status"] == "exact"]
        measured = [r for r in recs if r.get("input_sensitivity") is not None]
        blind = [r["model"] for r in measured if r["input_sensitivity"] < BLIND]
        if measured:
            shown = ", ".join(m.split(":", 1)[1] for m in blind[:8]) + (", ..." if len(blind) > 8 else "")
            blind_lines.append(
                f"- `{strategy}`: {len(blind)} of {len(measured)} exact models measured"
                + (f" ({shown})" if blind else "")
            )
    lines = list(rows)
    if blind_lines:
        lines += [
            "",
            f"Exact models whose output moves by less than {BLIND:g} (relative) between two random inputs, so "
            "that their check sees the kernels only through constant paths:",
            "",
            *blind_lines,
        ]
    lines += ["", "Layers left alone, most frequent reasons:", "", *refusals]
    lines += ["", "Inexact or failed:" if failures else "No model inexact or failed.", ""] + failures
    return "\n".join(lines).rstrip() + "\n"


def coverage(out: Path, strategies: list[str], total: int) -> str:
    """README's words for how much of the zoo the strategies other than ``ck+cl+fc`` cover."""
    others = [s for s in strategies if s != STRATEGY]
    if not others:
        return "-"
    recs = [read_records(results_file(out, s)) for s in others]
    covered = min(len(r) for r in recs)
    if covered >= total:
        return f"cover the whole zoo ({total:,} models)"
    largest = max((r.get("params") or 0 for rs in recs for r in rs), default=0)
    return f"cover {covered:,} of {total:,} models so far, smallest first (up to {largest / 1e6:.1f}M parameters)"


def write_docs(out: Path, strategies: list[str], total: int, table: str, text: str) -> None:
    """The summary into README.md (the per-strategy table and the coverage) and docs/zoo.md (all of it)."""
    from expandctl.experiments.markdown import update_marked

    readme, doc = ROOT / "README.md", ROOT / "docs" / "zoo.md"
    update_marked(readme, "zoo:table", table.split("\n\n", 1)[0].rstrip())
    update_marked(readme, "zoo:progress", coverage(out, strategies, total), inline=True)
    update_marked(doc, "zoo:summary", text.rstrip())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the {STRATEGY} results; others beside it")
    ap.add_argument(
        "--strategies",
        default=None,
        help=f"comma-separated strategies, each run on every model in one pass (default {STRATEGY}; "
        "for --summary, every strategy with a results file)",
    )
    ap.add_argument("--order", choices=("hash", "size"), default="hash", help="hash of the name, or smallest first")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--models", default="", help="comma-separated source:name globs (timm:*, tv:*, tvseg:*, tvdet:*)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N selected models")
    ap.add_argument("--max-params", type=float, default=MAX_PARAMS)
    ap.add_argument("--preserve-every", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per model and strategy")
    ap.add_argument("--per-worker", type=int, default=25, help="models per worker process before a fresh one")
    ap.add_argument("--summary", action="store_true", help="print the markdown summary of the results and exit")
    ap.add_argument(
        "--write-docs",
        action="store_true",
        help="with --summary: also write it into README.md and docs/zoo.md (between their zoo: markers)",
    )
    args = ap.parse_args(argv)
    from expandctl.rewrite import parse_strategy

    if args.strategies:
        strategies = list(dict.fromkeys("+".join(parse_strategy(s)) for s in args.strategies.split(",")))
    elif args.summary:
        found = [
            p.stem[len(args.out.stem) + 1 :]
            for p in sorted(args.out.parent.glob(f"{args.out.stem}_*{args.out.suffix}"))
        ]
        from expandctl.layers.base import strategy_names

        rank = {k: i for i, k in enumerate(strategy_names())}
        found.sort(key=lambda s: [rank.get(k, len(rank)) for k in s.split("+")])
        strategies = [STRATEGY] + [s for s in found if s != STRATEGY]
    else:
        strategies = [STRATEGY]
    models = all_models()
    if args.summary:
        table = strategy_table(args.out, strategies, len(models))
        parts = [table] + [f"\n### `{s}`\n\n{summary(results_file(args.out, s), len(models))}" for s in strategies]
        text = "\n".join(parts)
        print(text)
        if args.write_docs:
            write_docs(args.out, strategies, len(models), table, text)
        return
    if args.models:
        pats = [p if ":" in p else f"*:{p}" for p in args.models.split(",")]
        models = [m for m in models if any(fnmatch.fnmatchcase(m, p) for p in pats)]

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    if args.order == "size":
        models = order_by_size(models, args.out, log)
    if args.limit:
        models = models[: args.limit]
    sweep(
        models,
        args.out,
        args.workers,
        int(args.max_params),
        args.preserve_every,
        args.timeout,
        log,
        args.per_worker,
        tuple(strategies),
    )


if __name__ == "__main__":
    main()
