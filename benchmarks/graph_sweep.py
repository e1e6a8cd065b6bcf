"""``contract_graph`` on models it did not build: timm's own merge as the oracle, and the plain zoo.

**Oracle** (``graph_sweep_oracle.jsonl``). Every timm model family whose blocks have a ``fuse``,
``reparameterize`` or ``switch_to_deploy`` member (found in ``timm/models/*.py``, then grouped by
the model file and the block classes a model holds), its smallest ``--per-family`` models by
parameter count (all of them with ``--all``). Per model:

1. ``timm.create_model(name, pretrained=False, num_classes=10)``, input 3x64x64 where the model
   runs there, else its ``pretrained_cfg`` input size;
2. ``--steps`` train-mode SGD steps on random data (seed 0), so that the weights and the
   BatchNorm statistics move off their initial values; then eval and a float64 copy;
3. the reference is the float64 model on ``--batches`` random batches of 2; timm's merge is
   ``timm.utils.reparameterize_model`` built under ``torch.set_default_dtype(torch.float64)``
   (its ``fuse()`` methods create new modules in the default dtype); ours is
   ``contract_graph(model64, x)``;
4. recorded: regions merged / found, opaque modules, the candidates left alone (by reason),
   parameters + buffers of the original, timm's and ours, the worst relative error of both
   against the original (``max|diff| / max|ref|`` over the batches), the contract time, and the
   onnxruntime latency of both merged models exported to ONNX in float32
   (``expandctl.export.export_onnx``, checked against torch; batch 1, one thread, the fastest of
   ``--rounds`` interleaved rounds) and its ratio ours / timm.

**Zoo** (``graph_sweep_zoo.jsonl``). torchvision's classification models and ``--timm-sample``
timm models (the first within ``--max-params`` in ``zoo_sweep``'s hash order), built as
``zoo_sweep.prepare`` builds them (random init, random BatchNorm statistics, float64, eval, the
smallest input they take):
``contract_graph`` on one random input, then the worst float64 relative error on two; what it
merged, left alone and could not trace.

Both run through ``zoo_sweep.sweep``: one worker process at a time, replaced after a crash or a
``--timeout``, one JSON line per model appended as it finishes; a rerun skips the models a file
already holds.

    python benchmarks/graph_sweep.py [--part oracle,zoo] [--per-family 1 | --all] [--models repvgg_a0,...]
    python benchmarks/graph_sweep.py --summary [--write-docs]   # the markdown tables (into docs/graph.md)
"""

from __future__ import annotations

import argparse
import collections
import copy
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import zoo_sweep as zoo  # noqa: E402  (the zoo's model lists, worker loop, resume and timeouts)

DEFAULT_OUT = HERE / "results" / "graph_sweep.jsonl"
PARTS = ("oracle", "zoo")
#: timm's own merge methods (``timm.models._manipulate.reparameterize_model`` calls these)
METHODS = ("fuse", "reparameterize", "switch_to_deploy")
#: the goal of the oracle and the engine's own per-region check
TOLERANCE = 1e-9
ORACLE_SIZE = 64


def _count(module) -> int:
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def unused_tensors(gm) -> int:
    """Parameters + buffers a GraphModule holds but its graph never reads (neither a ``get_attr``
    target nor inside a called module): a merged BatchNorm's statistics left on a container module
    whose other child is still called (timm's ``BatchNormAct2d``). They are not part of the merged
    model's function and ONNX export drops them; counted apart so that the comparison is fair."""
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    total = 0
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        owner = name.rpartition(".")[0]
        if name in read or any(owner == m or owner.startswith(m + ".") for m in called):
            continue
        total += t.numel()
    return total


# --------------------------------------------------------------------------------------------------
# Which timm models: the families with their own merge
# --------------------------------------------------------------------------------------------------
def reparam_modules() -> list[str]:
    """timm model files (``byobnet``, ``fastvit``, ...) that define one of :data:`METHODS`."""
    import timm.models

    folder = Path(timm.models.__file__).parent
    pattern = re.compile(rf"^\s+def ({'|'.join(METHODS)})\(", re.M)
    return sorted(p.stem for p in folder.glob("*.py") if pattern.search(p.read_text()))


def reparam_classes(model) -> list[str]:
    """The block classes in ``model`` (below the top) that ``reparameterize_model`` would call."""
    return sorted(
        {type(m).__name__ for path, m in model.named_modules() if path and any(hasattr(m, k) for k in METHODS)}
    )


def oracle_models(per_family: int | None = 1) -> list[tuple[str, str, int]]:
    """``(family, model name, parameters)`` for each timm model holding a block with its own merge,
    the smallest ``per_family`` of each family (``None``: all). A family is a model file and the
    set of such block classes its models hold (byobnet's RepVGG and MobileOne are two, as are
    fastvit's models with and without attention)."""
    import timm
    from timm.models import _registry

    modules = set(reparam_modules())
    groups: dict[tuple[str, tuple[str, ...]], list[tuple[int, str]]] = collections.defaultdict(list)
    for name in timm.list_models():
        module = _registry._model_to_module.get(name)
        if module not in modules:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False, num_classes=10, device="meta")
        except Exception:  # does not build: the oracle cannot run it either
            continue
        classes = tuple(reparam_classes(model))
        if classes:
            groups[(module, classes)].append((sum(p.numel() for p in model.parameters()), name))
        del model
    chosen = []
    for (module, _classes), members in sorted(groups.items()):
        chosen += [(module, name, params) for params, name in sorted(members)[:per_family]]
    return chosen


def family_of(name: str) -> str:
    """A timm model's file (``byobnet``, ``fastvit``, ...)."""
    from timm.models import _registry

    return _registry._model_to_module.get(name, name)


# --------------------------------------------------------------------------------------------------
# One oracle model
# --------------------------------------------------------------------------------------------------
def _rel_error(model, reference, inputs) -> float:
    """Worst ``max|model(x) - ref| / max|ref|`` over the inputs (every output leaf)."""
    import torch

    from expandctl.verify import output_leaves

    worst = 0.0
    with torch.no_grad():
        for x, ref in zip(inputs, reference, strict=True):
            for (_, got), (_, want) in zip(output_leaves(model(x)), output_leaves(ref), strict=True):
                if not want.is_floating_point():
                    continue
                scale = want.abs().max().item() or 1.0
                worst = max(worst, (got - want).abs().max().item() / scale)
    return worst


def oracle_input(model, size: int | None = ORACLE_SIZE) -> list[int]:
    """3 x size x size where the model runs there, else its ``pretrained_cfg`` input size."""
    import torch

    native = list(getattr(model, "pretrained_cfg", {}).get("input_size") or (3, 224, 224))
    if size is None:
        return native
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(torch.randn(2, native[0], size, size))
        return [native[0], size, size]
    except Exception:
        return native


def _train(model, shape, steps: int, seed: int = 0) -> None:
    """A few train-mode SGD steps on random data: weights and BatchNorm statistics move."""
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, *shape, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _reason_key(reason: str) -> str:
    """A reason without its numbers (``12,288``, ``1.5e-10``, ``3x3``), so that the same cause groups."""
    return re.sub(r"\d[\d,]*(\.\d+)?(e[-+]?\d+)?", "N", reason or "")[:200]


def _left_alone(plan) -> dict[str, int]:
    """Candidates left alone, counted by reason."""
    reasons = [r["reason"] for r in plan.left_alone] + [r.reason for r in plan.regions if not r.merged]
    return dict(collections.Counter(_reason_key(r) for r in reasons if r).most_common())


_PASS = {"identity", "contiguous", "clone", "detach"}


def region_pattern(region) -> str:
    """What a merged region was: its layer count and its other step kinds, e.g. ``1 layer + BatchNorm``,
    ``3 layers + BatchNorm, add`` (a RepVGG block)."""
    kinds = [step.rsplit(" (", 1)[-1].rstrip(")") for step in region.steps]
    layers = sum(k.startswith("Conv") or k == "Linear" for k in kinds)
    others = sorted({k for k in kinds if k not in _PASS and not k.startswith("Conv") and k != "Linear"})
    return f"{layers} layer{'s' if layers != 1 else ''}" + (f" + {', '.join(others)}" if others else "")


def _plan_fields(plan) -> dict:
    return {
        "regions_found": len(plan.regions),
        "regions_merged": len(plan.merged),
        "merged_patterns": dict(collections.Counter(region_pattern(r) for r in plan.merged).most_common()),
        "opaque": dict(plan.opaque),
        "left_alone": _left_alone(plan),
        "worst_region_error": max((r.error for r in plan.merged if r.error is not None), default=None),
    }


def onnx_latency(models: dict, shape, rounds: int, folder: Path) -> tuple[dict, dict]:
    """Each model exported to ONNX in float32 (checked against torch by onnxruntime), then the
    fastest of ``rounds`` interleaved batch-1 runs on one thread, in milliseconds; and each
    graph's node count by op type."""
    from onnx_latency import histogram, latencies

    from expandctl.export import export_onnx

    paths = {}
    for key, model in models.items():
        path = folder / f"{key}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(model, path, shape, dynamic_batch=False)
        paths[key] = path
    times = latencies(paths, shape, rounds, warmup=5)
    ops = {k: dict(sorted(histogram(p).items())) for k, p in paths.items()}
    return {k: round(1e3 * min(v), 4) for k, v in times.items()}, ops


def run_oracle(name: str, size: int | None = ORACLE_SIZE, steps: int = 3, batches: int = 2, rounds: int = 50) -> dict:
    """The oracle on one timm model (see the module docstring); a failure is recorded with its stage."""
    import timm
    import torch
    from timm.utils import reparameterize_model

    from expandctl.graph import contract_graph

    torch.set_num_threads(1)
    rec: dict = {"model": f"timm:{name}", "family": family_of(name)}
    with zoo._stages(rec) as mark:
        mark("build")
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, num_classes=10)
        shape = oracle_input(model, size)
        rec["input"] = shape
        rec["classes"] = reparam_classes(model)
        mark("train")
        _train(model, shape, steps)
        model64 = copy.deepcopy(model).double().eval()
        g = torch.Generator().manual_seed(1)
        xs = [torch.randn(2, *shape, dtype=torch.float64, generator=g) for _ in range(batches)]
        with torch.no_grad():
            refs = [model64(x) for x in xs]
        rec["params"] = _count(model64)
        mark("timm")
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = reparameterize_model(model64).double().eval()
        finally:
            torch.set_default_dtype(default)
        rec["params_timm"] = _count(theirs)
        rec["timm_max_rel"] = _rel_error(theirs, refs, xs)
        mark("contract")
        t0 = time.perf_counter()
        ours = contract_graph(model64, xs[0])
        rec["contract_seconds"] = round(time.perf_counter() - t0, 2)
        rec["params_ours_unused"] = unused_tensors(ours)
        rec["params_ours"] = _count(ours) - rec["params_ours_unused"]
        rec.update(_plan_fields(ours.graph_plan))
        rec["max_rel"] = _rel_error(ours, refs, xs)
        rec["status"] = "exact" if rec["max_rel"] <= TOLERANCE else "inexact"
        if rounds:
            mark("onnx")
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    ms, ops = onnx_latency({"timm": theirs, "ours": ours}, shape, rounds, Path(tmp))
                rec["onnx_ms_timm"], rec["onnx_ms_ours"] = ms["timm"], ms["ours"]
                rec["onnx_ops_timm"], rec["onnx_ops_ours"] = ops["timm"], ops["ours"]
                rec["onnx_ratio"] = round(ms["ours"] / ms["timm"], 4)
            except Exception as e:  # the errors are recorded; the latency is a separate measurement
                rec["onnx_error"] = zoo._reason(e)
    return rec


# --------------------------------------------------------------------------------------------------
# One zoo model
# --------------------------------------------------------------------------------------------------
def zoo_models(timm_sample: int, max_params: int) -> list[str]:
    """torchvision's classification models (all: those above ``max_params`` are recorded as skipped),
    then the first ``timm_sample`` timm models within ``max_params`` in the zoo sweep's order (a hash
    of the name: a sample of every family)."""
    models = zoo.all_models()
    chosen = sorted(m for m in models if m.startswith("tv:"))
    sample = []
    for m in models:
        if len(sample) >= timm_sample:
            break
        if m.startswith("timm:") and (zoo.count_params(m) or 0) <= max_params:
            sample.append(m)
    return chosen + sample


def run_zoo(model_id: str, max_params: int) -> dict:
    """``contract_graph`` on one zoo model as ``zoo_sweep.prepare`` builds it; the float64 error on
    two random inputs (batch 1) and what the plan says."""
    import torch

    from expandctl.graph import contract_graph

    torch.set_num_threads(1)
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    model, rec = zoo.prepare(model_id, max_params)
    if model is None:
        return rec
    with zoo._stages(rec) as mark:
        mark("contract")
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(1, *rec["input"], dtype=torch.float64, generator=g) for _ in range(2)]
        t0 = time.perf_counter()
        ours = contract_graph(model, xs[0])
        rec["contract_seconds"] = round(time.perf_counter() - t0, 2)
        plan = ours.graph_plan
        rec.update(_plan_fields(plan))
        rec["params_after_unused"] = unused_tensors(ours)
        rec["params_before"], rec["params_after"] = _count(model), _count(ours) - rec["params_after_unused"]
        rec["untraceable"] = type(model).__name__ in plan.opaque and len(plan.opaque) == 1 and not plan.regions
        mark("compare")
        with torch.no_grad():
            refs = [model(x) for x in xs]
        rec["max_rel"] = _rel_error(ours, refs, xs)
        if rec["max_rel"] > TOLERANCE:
            rec["status"] = "inexact"
            mark("noise floor")  # what float64 rounding alone does to this model's output (zoo_sweep's measure)
            rec["noise_floor"] = zoo._noise_floor(model, rec["input"])
            rec["noise_floor_all"] = zoo._noise_floor(model, rec["input"], 1e-16, every_tensor=True)
        elif rec["untraceable"]:
            rec["status"] = "untraceable"
        else:
            rec["status"] = "merged" if plan.merged else "nothing"
    return rec


def _worker(max_params, _unused, conn):
    """``zoo_sweep``'s worker protocol (:func:`zoo_sweep.serve`): a job is ``(model id, parts)``."""

    def records(model_id, parts):
        for part in parts:
            yield part, run_oracle(model_id.split(":", 1)[1]) if part == "oracle" else run_zoo(model_id, max_params)

    zoo.serve(conn, records)


def part_file(out: Path, part: str) -> Path:
    return zoo.results_file(out, part)


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------
def _fmt_err(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def _short(model_id: str) -> str:
    return model_id.split(":", 1)[1]


def oracle_table(recs: list[dict]) -> str:
    rows = [
        "| family | model | timm's merging blocks | input | regions merged / found | parameters before | timm | "
        "expandctl | worst error timm | worst error expandctl | contract s | onnxruntime ours / timm | same ONNX ops |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    failed = []
    for r in recs:
        if r.get("status") not in ("exact", "inexact"):
            failed.append(
                f"- {_short(r['model'])} ({r.get('family', '')}): failed at {r.get('stage')}: "
                f"{r.get('reason', '')[:200]}"
            )
            continue
        ratio = f"{r['onnx_ratio']:.2f}" if r.get("onnx_ratio") is not None else "export failed"
        same = "-" if "onnx_ops_ours" not in r else ("yes" if r["onnx_ops_ours"] == r["onnx_ops_timm"] else "no")
        rows.append(
            f"| {r['family']} | {_short(r['model'])} | {', '.join(r['classes'])} | "
            f"{'x'.join(map(str, r['input'][1:]))} | "
            f"{r['regions_merged']} / {r['regions_found']} | {r['params']:,} | {r['params_timm']:,} | "
            f"{r['params_ours']:,} | {_fmt_err(r['timm_max_rel'])} | {_fmt_err(r['max_rel'])} | "
            f"{r['contract_seconds']:.1f} | {ratio} | {same} |"
        )
    ran = [r for r in recs if r.get("status") in ("exact", "inexact")]
    lines = rows
    if ran:
        fewer = sum(r["params_ours"] <= r["params_timm"] for r in ran)
        worst = max(ran, key=lambda r: r["max_rel"])
        ratios = [r["onnx_ratio"] for r in ran if r.get("onnx_ratio") is not None]
        lines += [
            "",
            f"{len(ran)} models from {len({(r['family'], *r['classes']) for r in ran})} families: "
            f"{sum(r['status'] == 'exact' for r in ran)} within {TOLERANCE:g} of the original in float64 "
            f"(worst {worst['max_rel']:.1e}, {_short(worst['model'])}; timm's own merge: worst "
            f"{max(r['timm_max_rel'] for r in ran):.1e}); expandctl's parameters + buffers equal to or below "
            f"timm's in {fewer} of {len(ran)}."
            + (
                f" onnxruntime latency ours / timm: {min(ratios):.2f} to {max(ratios):.2f} "
                f"(median {sorted(ratios)[len(ratios) // 2]:.2f})."
                if ratios
                else ""
            ),
        ]
        same = sorted(
            r["onnx_ratio"]
            for r in ran
            if r.get("onnx_ratio") and r.get("onnx_ops_ours") is not None and r["onnx_ops_ours"] == r["onnx_ops_timm"]
        )
        if same:
            lines[-1] += (
                f" Where both ONNX graphs hold the same ops ({len(same)} models) the ratio is "
                f"{min(same):.2f} to {max(same):.2f}, median {same[len(same) // 2]:.2f}: the spread of one "
                "measurement on this machine."
            )
        unused = [r for r in ran if r.get("params_ours_unused")]
        if unused:
            lines.append(
                f"The merged GraphModule of {len(unused)} models also holds tensors its graph never reads (a merged "
                "BatchNorm's statistics left on a container module whose other child is still called), not counted "
                "above: " + ", ".join(f"{_short(r['model'])} {r['params_ours_unused']:,}" for r in unused) + "."
            )
        more = [r for r in ran if r["params_ours"] > r["params_timm"]]
        if more:
            lines += ["", "Where timm's merge holds fewer parameters, what expandctl left alone:", ""]
            for r in more:
                shown = "; ".join(f"{n} x {k}" for k, n in list(r.get("left_alone", {}).items())[:3])
                lines.append(
                    f"- {_short(r['model'])}: {r['params_ours'] - r['params_timm']:,} more ({shown or 'nothing'})"
                )
        differ = [r for r in ran if "onnx_ops_ours" in r and r["onnx_ops_ours"] != r["onnx_ops_timm"]]
        if differ:
            lines += ["", "Where the two ONNX graphs differ (op: timm's count vs ours):", ""]
            for r in differ:
                a, b = r["onnx_ops_timm"], r["onnx_ops_ours"]
                ops = ", ".join(f"{k} {a.get(k, 0)} vs {b.get(k, 0)}" for k in sorted({*a, *b}) if a.get(k) != b.get(k))
                lines.append(f"- {_short(r['model'])}: {ops}")
        opaque = collections.defaultdict(list)
        for r in ran:
            for module, reason in r.get("opaque", {}).items():
                opaque[_reason_key(reason)[:160]].append(f"{_short(r['model'])}: {module}")
        if opaque:
            lines += ["", "Opaque modules (not traced, kept whole):", ""]
            for reason, where in sorted(opaque.items(), key=lambda kv: -len(kv[1])):
                models = sorted({w.split(":")[0] for w in where})
                lines.append(f"- {len(where)} x `{reason}` in {', '.join(models)} (e.g. {where[0]})")
        onnx_failed = [r for r in ran if r.get("onnx_error")]
        if onnx_failed:
            lines += ["", "ONNX export failed:", ""]
            lines += [f"- {_short(r['model'])}: {r['onnx_error'][:200]}" for r in onnx_failed]
    if failed:
        lines += ["", "Failed:", "", *failed]
    return "\n".join(lines)


ZOO_STATUSES = ("merged", "nothing", "untraceable", "inexact", "failed", "skipped")


def zoo_summary(recs: list[dict]) -> str:
    by = collections.Counter(r["status"] for r in recs)
    sources = collections.Counter(r["model"].split(":", 1)[0] for r in recs)
    lines = [
        f"Models: {len(recs)} ({', '.join(f'{n} {s}' for s, n in sources.items())}).",
        "",
        "| status | models |",
        "|---|--:|",
    ]
    lines += [f"| {s} | {by[s]} |" for s in ZOO_STATUSES if by[s]]
    ran = [r for r in recs if r["status"] in ("merged", "nothing", "untraceable", "inexact")]
    if ran:
        worst = max(ran, key=lambda r: r["max_rel"])
        regions = sum(r["regions_merged"] for r in ran)
        found = sum(r["regions_found"] for r in ran)
        before = sum(r["params_before"] for r in ran)
        after = sum(r["params_after"] for r in ran)
        secs = sorted(r["contract_seconds"] for r in ran)
        lines += [
            "",
            f"Regions merged: {regions} of {found} found; parameters + buffers {before:,} -> {after:,} "
            f"({100 * (before - after) / before:.1f}% fewer). Worst float64 relative error of any model: "
            f"{worst['max_rel']:.1e} ({_short(worst['model'])}); inexact (above {TOLERANCE:g}): {by['inexact']}. "
            f"Contract time: median {secs[len(secs) // 2]:.1f} s, longest {secs[-1]:.1f} s.",
        ]
        blind = [r for r in ran if r.get("input_sensitivity") is not None and r["input_sensitivity"] < zoo.BLIND]
        if blind:
            lines.append(
                f"{len(blind)} of them have an output that moves by less than {zoo.BLIND:g} (relative) between two "
                "random inputs (random BatchNorm statistics drown the signal), so their check is weak: "
                + ", ".join(_short(r["model"]) for r in blind[:8])
                + (", ..." if len(blind) > 8 else "")
                + "."
            )
        patterns = collections.Counter()
        for r in ran:
            patterns.update(r.get("merged_patterns", {}))
        if patterns:
            lines += ["", "What the merged regions were (layers, and the other linear steps in them):", ""]
            lines += [f"- {n} x {pattern}" for pattern, n in patterns.most_common(8)]
        left = collections.Counter()
        for r in ran:
            for reason, n in r.get("left_alone", {}).items():
                left[reason] += n
        if left:
            lines += ["", "Left alone, most frequent reasons:", ""]
            lines += [f"- {n} x {reason}" for reason, n in left.most_common(8)]
        opaque = collections.defaultdict(list)
        for r in ran:
            for module, reason in r.get("opaque", {}).items():
                opaque[_reason_key(reason)[:140]].append(f"{_short(r['model'])}:{module}")
        if opaque:
            n = sum(len(v) for v in opaque.values())
            lines += [
                "",
                f"Opaque modules (not traced, kept whole): {n} in "
                f"{len({m.split(':')[0] for v in opaque.values() for m in v})} models",
                "",
            ]
            for reason, where in sorted(opaque.items(), key=lambda kv: -len(kv[1]))[:10]:
                shown = ", ".join(where[:4]) + (", ..." if len(where) > 4 else "")
                lines.append(f"- {len(where)} x `{reason}`: {shown}")
    whole = [r for r in recs if r["status"] == "untraceable"]
    if whole:
        lines += [
            "",
            "Untraceable as a whole (returned unchanged): "
            + ", ".join(f"{_short(r['model'])} ({next(iter(r['opaque'].values()), '')[:120]})" for r in whole),
        ]
    inexact = [r for r in recs if r["status"] == "inexact"]
    if inexact:
        lines += ["", "Inexact (the whole model above the tolerance; each merged region is checked on its own):", ""]
        for r in inexact:
            line = f"- {_short(r['model'])}: off by {r['max_rel']:.2g}, its merged regions each by at most "
            line += f"{r['worst_region_error']:.2g}" if r.get("worst_region_error") is not None else "-"
            if r.get("noise_floor") is not None:
                line += (
                    f"; the original model's output moves by {r['noise_floor']:.2g} under 1e-15 relative noise on "
                    f"its weights, by {r['noise_floor_all']:.2g} under 1e-16 on every tensor (rounding amplified)"
                )
            lines.append(line)
    failed = [r for r in recs if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed:", ""]
        lines += [f"- {_short(r['model'])}: {r.get('stage', '')} {r.get('reason', '')[:200]}" for r in failed]
    return "\n".join(lines)


def summary(out: Path) -> dict[str, str]:
    """``{"oracle": markdown, "zoo": markdown}`` for the parts that have results."""
    texts = {}
    oracle = zoo.read_records(part_file(out, "oracle"))
    if oracle:
        texts["oracle"] = oracle_table(sorted(oracle, key=lambda r: (r.get("family", ""), r.get("params") or 0)))
    recs = zoo.read_records(part_file(out, "zoo"))
    if recs:
        texts["zoo"] = zoo_summary(recs)
    return texts


def write_docs(texts: dict[str, str], doc: Path = ROOT / "docs" / "graph.md") -> list[str]:
    """Each part's summary between its ``graph:<part>`` markers in ``doc``; the parts written."""
    from expandctl.experiments.markdown import update_marked

    return [part for part, text in texts.items() if update_marked(doc, f"graph:{part}", text.rstrip())]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results: <out>_oracle.jsonl, <out>_zoo.jsonl")
    ap.add_argument("--part", default="oracle,zoo", help="oracle, zoo or both")
    ap.add_argument("--per-family", type=int, default=1, help="oracle: the smallest N models of each family")
    ap.add_argument("--all", action="store_true", help="oracle: every model of every family")
    ap.add_argument("--models", default="", help="comma-separated names: only these (oracle: timm names)")
    ap.add_argument("--timm-sample", type=int, default=40, help="zoo: timm models besides torchvision's")
    ap.add_argument("--max-params", type=float, default=40e6, help="zoo: models above are recorded as skipped")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per model")
    ap.add_argument("--summary", action="store_true", help="print the markdown tables of the results and exit")
    ap.add_argument("--write-docs", action="store_true", help="with --summary: also into docs/graph.md")
    args = ap.parse_args(argv)
    if args.summary:
        texts = summary(args.out)
        for part, text in texts.items():
            print(f"## {part}\n\n{text}\n")
        if args.write_docs:
            print("written into docs/graph.md:", ", ".join(write_docs(texts)) or "nothing changed")
        return

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    wanted = [m for m in args.models.split(",") if m]
    for part in args.part.split(","):
        if part not in PARTS:
            ap.error(f"--part: {part!r} is not one of {', '.join(PARTS)}")
        if part == "oracle":
            if wanted:  # any timm model, in a family or not
                models = [f"timm:{name}" for name in wanted]
            else:
                models = [f"timm:{name}" for _, name, _ in oracle_models(None if args.all else args.per_family)]
        else:
            models = zoo_models(args.timm_sample, int(args.max_params))
            if wanted:
                models = [m for m in models if m in wanted or m.split(":", 1)[1] in wanted]
        log(f"{part}: {len(models)} models")
        zoo.sweep(
            models,
            args.out,
            1,
            int(args.max_params),
            0,
            args.timeout,
            log,
            per_worker=10,
            strategies=(part,),
            worker=_worker,
        )


if __name__ == "__main__":
    main()
