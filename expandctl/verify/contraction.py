"""The contraction check: the expanded model (its chains run explicitly) against the contracted one,
in float64 and float32, judged against the contracted model's own rounding floor."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .. import rewrite
from ..errors import CheckFailed, UsageError
from ..progress import Progress, Silent
from ..rewrite import contract, expanded_layers
from ..shapes import running_model
from .core import (
    FLOOR_DRAWS,
    FLOOR_MULTIPLE,
    OutputCheck,
    Report,
    _Accumulator,
    _device,
    _inputs,
    _name,
    _nan_last,
    _prepare,
    _ratio,
    check_args,
    compare_models,
    output_leaves,
)

__all__ = ["check_contraction", "rounding_floor"]


def check_contraction(
    expanded: nn.Module,
    contracted: nn.Module,
    input_shape: Sequence[int],
    *,
    dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32),
    samples: int = 2,
    batch: int = 2,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> list[Report]:
    """One ``"expanded-vs-contracted"`` report per dtype: the explicit chain is the reference.

    When the factors are stored in a coarser dtype than a check's dtype (the usual float32
    checkpoint checked in float64), that check contracts a copy of the factors in its own dtype:
    otherwise the float32 rounding of the stored product would hide an algebra error behind
    float32 tolerances. The check in the storage dtype covers the weights that are written.

    Each report also carries the contracted model's rounding floor in its dtype (:func:`rounding_floor`,
    per output); with the default tolerances an output whose error exceeds them but stays within
    :data:`FLOOR_MULTIPLE` times its floor passes (``within_floor``, and a note says so). Explicit
    ``atol``/``rtol`` are kept as given.
    """
    left = [path for path, _ in expanded_layers(contracted)]
    if left:
        paths = ", ".join(left[:5])
        raise UsageError(f"the contracted model still has expanded layers ({paths}); contract it first")
    settings = {"samples": samples, "batch": batch, "seed": seed, "atol": atol, "rtol": rtol}
    reports = []
    for d in dtypes:
        coarser = [p for p in expanded.parameters() if torch.finfo(p.dtype).eps > torch.finfo(d).eps]
        source = expanded
        if coarser:
            source = widened = copy.deepcopy(expanded).to(d)
            report = compare_models(
                widened, contract(widened), input_shape, dtype=d, kind="expanded-vs-contracted", **settings
            )
            report.notes.append(f"algebra check: factors widened to {_name(d)} and contracted in {_name(d)}")
        else:
            report = compare_models(
                expanded, contracted, input_shape, dtype=d, kind="expanded-vs-contracted", **settings
            )
        _apply_floor(report, contract(widened) if coarser else contracted, d, accept=atol is None and rtol is None)
        linear = _check_linear_parts(source, report)
        if linear is not None:
            report.outputs.append(linear)
            report.notes.append(
                "fused-only layers run their own forward on the composed kernel in both models; "
                f"{linear.name} compares that kernel with the chain run on the layers' inputs"
            )
        reports.append(report)
    return reports


@torch.no_grad()
def rounding_floor(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    samples: int = 2,
    batch: int = 2,
    seed: int = 0,
    draws: int = FLOOR_DRAWS,
) -> dict[str, float]:
    """The model's own rounding floor in ``dtype``, per output: the largest ``max|y' - y| / max|y|``
    over ``draws`` copies whose every floating parameter and buffer is multiplied by
    ``1 + eps * N(0, 1)`` (``eps`` of ``dtype``: one rounding of every stored number), on the inputs
    :func:`compare_models` draws with ``seed``. A contraction cannot be asked to be closer than this:
    the merged tensors are rounded at least once."""
    shape = check_args(input_shape, samples, batch)
    eps = torch.finfo(dtype).eps
    clean = _prepare(model, dtype)
    device = _device(clean)
    inputs = [x.to(dtype).to(device) for x in _inputs(shape, samples, batch, seed)]
    refs = [output_leaves(clean(x)) for x in inputs]
    floor: dict[str, float] = {}
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(draws):
        noisy = copy.deepcopy(clean)
        for t in [*noisy.parameters(), *noisy.buffers()]:
            if t.is_floating_point():
                t.mul_(1 + eps * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t))
        acc = _Accumulator()
        for x, ref in zip(inputs, refs, strict=True):
            acc.add_all(ref, output_leaves(noisy(x)))
        for check in acc.checks(0.0, 0.0):
            if math.isfinite(check.max_rel):
                floor[check.name] = max(floor.get(check.name, 0.0), check.max_rel)
    return floor


def _apply_floor(report: Report, contracted: nn.Module, dtype: torch.dtype, accept: bool = True) -> None:
    """Measure the contracted model's rounding floor on the report's inputs; with ``accept`` (the default
    tolerances: explicit ones are the caller's to keep), an output above ``atol + rtol * max|a|`` passes
    when its error is within :data:`FLOOR_MULTIPLE` times its floor."""
    floor = rounding_floor(contracted, report.input_shape, dtype=dtype, samples=report.samples, batch=report.batch,
                           seed=report.seed)  # fmt: skip
    for o in report.outputs:
        o.floor = floor.get(o.name)
        within = o.floor is not None and o.max_rel <= FLOOR_MULTIPLE * o.floor
        if accept and within and not o.passed and o.reason is None:
            o.passed = o.within_floor = True
            report.notes.append(
                f"{o.name} ({_name(dtype)}): error {o.max_rel:.3g} is above rtol but {_ratio(o.max_rel, o.floor):.3g}x "
                f"the contracted model's rounding floor {o.floor:.3g} (its output's movement under {_name(dtype)} "
                f"rounding-sized noise on every tensor), within the accepted {FLOOR_MULTIPLE:g}x"
            )


@torch.no_grad()
def _check_linear_parts(expanded: nn.Module, report: Report) -> OutputCheck | None:
    """For fused-only layers (subclasses running their own forward on the composed kernel): the
    composed kernel as one plain layer against the chain run on the activations, at the inputs each
    layer sees in the model, with the report's inputs and tolerances. ``None`` if there are none."""
    model = _prepare(expanded, getattr(torch, report.dtype))
    layers = [(path, layer) for path, layer in expanded_layers(model) if layer.fused_only is not None]
    if not layers:
        return None
    accs = {path: _Accumulator() for path, _ in layers}

    def hook(path):
        def check(layer, args):
            composed, chain = layer.linear_part(args[0])
            accs[path].add("linear", chain, composed)

        return check

    handles = [layer.register_forward_pre_hook(hook(path)) for path, layer in layers]
    try:
        device = _device(model)
        for x in _inputs(report.input_shape, report.samples, report.batch, report.seed):
            model(x.to(getattr(torch, report.dtype)).to(device))
    finally:
        for h in handles:
            h.remove()
    checks = {path: acc.checks(report.atol, report.rtol) for path, acc in accs.items()}
    checks = {path: c[0] for path, c in checks.items() if c}
    name = f"linear part of {len(layers)} fused-only layers"
    if not checks:
        return OutputCheck(name, math.nan, math.nan, False, "no fused-only layer ran on the inputs")
    worst = max(checks, key=lambda p: _nan_last(checks[p].max_rel))
    failed = [p for p, c in checks.items() if not c.passed]
    reason = f"worst {worst}" + (f"; failed: {', '.join(failed[:5])}" if failed else "")
    return OutputCheck(
        name,
        max(c.max_abs for c in checks.values()),
        checks[worst].max_rel,
        not failed and len(checks) == len(layers),
        None if not failed else reason,
    )


def failed_reports(reports: Sequence) -> list:
    return [r for r in reports if not r.passed]


def check_failed(message: str, reports: Sequence, title: str = "checks", **details) -> CheckFailed:
    """A :class:`CheckFailed` that carries its reports: ``.reports`` (objects, ``title`` names the table)
    and ``.details`` (what ``--json`` prints)."""
    err = CheckFailed(message)
    err.details = {"passed": False, "checks": [r.to_dict() for r in reports], **details}
    err.reports = list(reports)
    err.reports_title = title
    return err


def contract_model_checked(
    model: nn.Module,
    shape,
    atol=None,
    rtol=None,
    progress: Progress | None = None,
    *,
    recorded=None,
    what: str = "the model",
    written: str = "nothing was written",
    tolerances: str = "atol/rtol",
    **check_kw,
) -> tuple[nn.Module, list]:
    """A contracted copy of ``model`` and its expanded-vs-contracted reports (float64, float32); a
    mismatch raises :class:`CheckFailed` carrying them, its message ending with ``written`` (what the
    caller did not write) and the ``tolerances`` to loosen."""
    progress = progress or Silent()
    with progress.step("contracting expanded layers"):
        compact = rewrite.contract(model)  # looked up when called: tests patch rewrite.contract
    with (
        progress.step("checking the contracted model against the expanded one (float64, float32)"),
        running_model(shape, recorded, what),
    ):
        reports = check_contraction(model, compact, shape, atol=atol, rtol=rtol, **check_kw)
    if failed_reports(reports):
        raise check_failed(
            "the contracted model does not match the expanded one "
            f"({'; '.join(r.summary() for r in failed_reports(reports))}); "
            f"{written}. Loosen {tolerances} only if the errors are rounding",
            reports,
            "expanded (explicit) vs contracted",
        )
    return compact, reports
