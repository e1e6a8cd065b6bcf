"""The workflows of ``expandctl expand`` and ``expandctl contract``, as library functions. Never prints.

>>> from expandctl import load_checkpoint
>>> from expandctl.workflows import contract_checkpoint, expand_checkpoint
>>> r = expand_checkpoint(load_checkpoint("resnet.pt"), "resnet.expanded.pt", strategy="ck+fc", rate=4)
>>> r.params_before, r.params_after
>>> c = contract_checkpoint(load_checkpoint("run/best.pt"), "compact.onnx")  # contract, check, export
>>> c.reports  # expanded vs contracted in float64 and float32, then PyTorch vs onnxruntime

``expand_checkpoint``: plan -> expand -> save. ``contract_checkpoint``: contract -> check against the
chains -> fold BatchNorm (if asked) -> check -> save or export to ONNX (checked with onnxruntime).
Nothing is written when a check fails: :class:`CheckFailed` carries the reports (``.reports``,
``.details``). The CLI passes its console as ``progress`` (anything with ``step(text)``, a context
manager around slow work, and ``warn(text)``); without it the functions are silent.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from . import checkpoint as ckpt_io
from .errors import CheckFailed, PreserveFitError, UnsupportedError, UsageError
from .shapes import fmt_shape, run_once, running_model

__all__ = [
    "ExpandResult",
    "ContractResult",
    "Progress",
    "expand_checkpoint",
    "contract_checkpoint",
    "contract_checked",
    "fresh_checkpoint",
    "onnx_metadata",
    "count_params",
    "check_failed",
    "check_expanded_size",
    "failed_reports",
]


class Progress(Protocol):
    """What the workflows report on their way: slow steps and warnings (the CLI's console is one)."""

    def step(self, text: str) -> contextlib.AbstractContextManager: ...

    def warn(self, text: str) -> None: ...


class _Silent:
    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        yield

    def warn(self, text: str) -> None:
        pass


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#: A plan whose expanded model has more than this many times the compact model's parameters gets a warning.
FAR_BEYOND_COMPACT = 50


def available_memory() -> int | None:
    """Bytes this machine can still allocate without swapping (``MemAvailable``), else free physical memory."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def check_expanded_size(model: nn.Module, plan, what: str = "the expanded model", refuse: bool = True) -> list[str]:
    """Estimate the expanded model's size from ``plan`` before anything is allocated: a
    :class:`UsageError` when its parameters alone cannot fit in the memory this machine has
    available (``refuse=False``, a dry run: a warning saying so), and the warnings to show with the
    plan (a model far beyond compact: the factor)."""
    compact = count_params(model)
    expanded = compact - plan.params_before + plan.params_after
    itemsize = next((p.element_size() for p in model.parameters()), 4)
    need, have = expanded * itemsize, available_memory()
    warnings = []
    factor = expanded / compact if compact else 1.0
    if factor > FAR_BEYOND_COMPACT:
        warnings.append(
            f"{what} has {expanded:,} parameters, {factor:,.0f}x the compact model's {compact:,} "
            f"({plan.strategy}, {_fmt_rate(plan.rate)}); check --rate"
        )
    if have is not None and need > have:
        error = UsageError(
            f"{what} would need {fmt_bytes(need)} for its {expanded:,} parameters alone ({plan.strategy}, "
            f"{_fmt_rate(plan.rate)}), but this machine has {fmt_bytes(have)} of memory available; "
            "lower --rate or expand fewer layers (--include/--exclude)"
        )
        if refuse:
            raise error
        warnings.append(f"refused without --dry-run: {error}")
    return warnings


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


def onnx_metadata(ckpt: ckpt_io.Checkpoint, shape, folded: Sequence, command: str | None = None) -> dict[str, str]:
    """Provenance carried into the ONNX file's metadata_props (see docs/cli.md)."""
    return {
        "expandctl.plan": json.dumps(ckpt.plan),
        "expandctl.source_sha256": ckpt.sha256 or "",
        "expandctl.source": ckpt.path.name if ckpt.path else "",
        "expandctl.arch": json.dumps({"spec": ckpt.arch, "kwargs": ckpt.arch_kwargs}),
        "expandctl.input_shape": json.dumps(list(shape)),
        "expandctl.folded_bn": json.dumps(list(folded)),
        "expandctl.source_provenance": json.dumps(ckpt.provenance, default=str),
        "expandctl.command": command or "",
    }


def export_checked(model: nn.Module, out: Path, shape, reports: list, **export_kw) -> None:
    """Export ``model`` to ONNX and append onnxruntime's report to ``reports``; a mismatch raises the
    :class:`CheckFailed` of :func:`check_failed` carrying every report so far (nothing is written)."""
    from .export import export_onnx

    try:
        _, report = export_onnx(model, out, shape, **export_kw)
    except CheckFailed as e:
        if getattr(e, "report", None) is not None:
            reports.append(e.report)
            raise check_failed(str(e) + "; nothing was written", reports) from None
        raise
    if report is not None:
        reports.append(report)


def contract_checked(
    ckpt: ckpt_io.Checkpoint, shape, atol=None, rtol=None, progress: Progress | None = None, **check_kw
) -> tuple[nn.Module, list]:
    """The compact model and the expanded-vs-contracted reports; raises CheckFailed on a mismatch."""
    return contract_model_checked(
        ckpt.model, shape, atol, rtol, progress, recorded=ckpt.input_shape, written="nothing was written",
        tolerances="--atol/--rtol", **check_kw,
    )  # fmt: skip


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
    from .rewrite import contract as contract_model
    from .verify import check_contraction

    progress = progress or _Silent()
    with progress.step("contracting expanded layers"):
        compact = contract_model(model)
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


# --- expand ----------------------------------------------------------------------------------------
@dataclass
class ExpandResult:
    """What :func:`expand_checkpoint` planned, built and wrote. ``model`` and ``output`` are ``None``
    on a dry run; ``to_dict()`` is ``expandctl expand --json``'s object."""

    source: str | None
    checkpoint: ckpt_io.Checkpoint
    plan: Any
    plan_dict: dict
    input_shape: tuple[int, ...] | None
    strategy: str
    init: str
    seed: int | None
    params_before: int
    params_after: int
    dry_run: bool = False
    output: Path | None = None
    model: nn.Module | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        arch = {"spec": self.checkpoint.arch, "kwargs": self.checkpoint.arch_kwargs}
        layers = [e.path for e in self.plan.expanded]
        if self.dry_run:
            return {
                "dry_run": True,
                "source": self.source,
                "arch": arch,
                "params_before": self.params_before,
                "params_after": self.params_after,
                "expanded_layers": layers,
                "plan": self.plan_dict,
                "warnings": self.warnings,
            }
        return {
            "output": str(self.output),
            "source": self.source,
            "arch": arch,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "strategy": self.plan.strategy,
            "rate": self.plan.rate,
            "init": self.init,
            "seed": self.seed,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "expanded_layers": layers,
            "plan": self.plan_dict,
            "warnings": self.warnings,
        }


def fresh_checkpoint(
    arch: str, arch_kwargs: dict | None = None, seed: int | None = None, progress: Progress | None = None
) -> ckpt_io.Checkpoint:
    """A freshly built ``arch`` model (seeded by ``seed`` without touching the global generator)."""
    from .models import build_arch, resolve_arch

    progress = progress or _Silent()
    spec = resolve_arch(arch)[0]
    with progress.step(f"building {spec}"), torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = build_arch(spec, arch_kwargs)
    return ckpt_io.Checkpoint(
        model, spec, dict(arch_kwargs or {}), ckpt_io.infer_input_shape(spec, arch_kwargs, model), format="fresh"
    )


def expand_checkpoint(
    ckpt: ckpt_io.Checkpoint,
    output: str | Path | None = None,
    *,
    strategy: str = "ck+fc",
    rate: float | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    pointwise: bool = False,
    init: str = "scratch",
    seed: int | None = None,
    input_shape: Sequence[int] | None = None,
    source: str | None = None,
    dry_run: bool = False,
    command: str | None = None,
    progress: Progress | None = None,
) -> ExpandResult:
    """Plan ``ckpt``'s expansion, expand it and save it to ``output`` (``dry_run``: plan only; the
    result's plan then says what would be expanded, possibly nothing). The model is run once on
    ``input_shape`` (default: the one ``ckpt`` records) first, so a wrong shape fails before any work."""
    from .layers import INIT_MODES
    from .rewrite import expand as expand_model
    from .rewrite import expanded_layers
    from .rewrite import plan as make_plan

    progress = progress or _Silent()
    if init not in INIT_MODES:
        raise UsageError(f"--init must be one of {', '.join(INIT_MODES)}, got {init!r}")
    if output is None and not dry_run:
        raise UsageError("give an output path to write the expanded checkpoint to")
    source = source if source is not None else (str(ckpt.path) if ckpt.path else None)
    shape = tuple(input_shape) if input_shape else ckpt.input_shape
    if shape is not None:
        with progress.step(f"running the model once on {fmt_shape(shape)}"):
            run_once(ckpt.model, shape, source or ckpt.arch)  # a wrong --input-shape fails here, not at train
    with progress.step("planning"):
        plan = make_plan(ckpt.model, strategy, rate, include, exclude, pointwise)
    before = count_params(ckpt.model)
    result = ExpandResult(
        source, ckpt, plan, plan.to_dict(), shape, strategy, init, seed, before,
        before - plan.params_before + plan.params_after, dry_run=dry_run,
    )  # fmt: skip
    if (blocks := plan.in_blocks()) is not None:
        result.warnings.append(blocks)
    if dry_run:
        result.warnings += check_expanded_size(ckpt.model, plan, refuse=False)
        return result
    result.warnings += check_expanded_size(ckpt.model, plan)  # before anything is allocated
    if not plan.expanded:
        raise plan.nothing_selected("run with --dry-run to see why each was left alone")
    if ckpt.arch is None:
        raise UsageError(
            f"{source} holds a pickled {ckpt.provenance.get('pickled_class', 'model')} "
            "whose builder cannot be "
            "inferred, and an expandctl checkpoint must be rebuildable; pass --arch (and --arch-kwargs)"
        )
    out = Path(output)
    with progress.step(f"expanding {len(plan.expanded)} layers ({plan.strategy}, {_fmt_rate(plan.rate)})"):
        try:
            expanded = expand_model(
                ckpt.model, strategy, rate, init=init, include=include, exclude=exclude, pointwise=pointwise, seed=seed
            )
        except PreserveFitError as e:  # the library's words (init='scratch') in the CLI's (--init scratch)
            words = re.sub(r"init='(\w+)'", r"--init \1", str(e)).replace("a larger rate", "a larger --rate")
            raise PreserveFitError(words) from None
    residuals = {path: layer.fit_residual for path, layer in expanded_layers(expanded)}
    for entry in plan.expanded:
        entry.fit_residual = residuals.get(entry.path)
    plan_dict = plan.to_dict()
    if ckpt.plan and ckpt.layout:  # expanding a model that is already partly expanded
        plan_dict["previous"] = ckpt.plan
    with progress.step(f"writing {out}"):
        ckpt_io.save(
            expanded,
            out,
            arch=ckpt.arch,
            arch_kwargs=ckpt.arch_kwargs,
            input_shape=shape,
            plan=plan_dict,
            parent_sha256=ckpt.sha256,
            command=command,
            folded_bn=ckpt.folded_bn,
        )
    result.plan_dict, result.output, result.model = plan_dict, out, expanded
    result.params_after = count_params(expanded)
    if shape is None:
        result.warnings.append(
            "the input shape is unknown; pass --input-shape to contract, verify or export this checkpoint"
        )
    return result


def _fmt_rate(rate: float | None) -> str:
    return "default rates" if rate is None else f"rate {rate:g}"  # as console.fmt_rate: the step's words


# --- contract --------------------------------------------------------------------------------------
@dataclass
class ContractResult:
    """What :func:`contract_checkpoint` wrote; ``to_dict()`` is ``expandctl contract --json``'s object."""

    source: str
    output: Path
    model: nn.Module
    contracted_layers: list[str]
    folded_bn: list
    input_shape: tuple[int, ...]
    dynamic_size: bool
    params_before: int
    params_after: int
    reports: list
    precise_bn: dict | None = None  # what --precise-bn recomputed: layers, batches, images, data

    @property
    def format(self) -> str:
        return "onnx" if self.output.suffix.lower() == ".onnx" else self.output.suffix.lstrip(".")

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "source": self.source,
            "format": self.format,
            "already_compact": not self.contracted_layers,
            "contracted_layers": self.contracted_layers,
            "folded_bn": self.folded_bn,
            "input_shape": list(self.input_shape),
            "dynamic_size": self.dynamic_size,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "passed": True,
            "checks": [r.to_dict() for r in self.reports],
            "precise_bn": self.precise_bn,
        }


def recompute_batchnorm(ckpt: ckpt_io.Checkpoint, data: str, batches: int) -> dict:
    """Precise BatchNorm statistics for a trained checkpoint (in place on ``ckpt.model``): every
    BatchNorm's running statistics recomputed over ``batches`` batches of ``data``'s training split
    (:mod:`expandctl.train.precise_bn`). The data adapters, batch size and seed are those the run
    recorded (``expandctl train`` checkpoints), else no adapter, batch 128, seed 0."""
    from .datasets import DataOptions, load_data
    from .train.precise_bn import precise_batchnorm, shuffled_batches

    recorded = ((ckpt.extra or {}).get("train") or {}).get("config") or {}
    options = DataOptions(
        recorded.get("channels"), recorded.get("image_size"), recorded.get("augment"),
        recorded.get("train_subset"), False, recorded.get("val_fraction"),
    )  # fmt: skip
    splits = load_data(data, input_shape=ckpt.input_shape, options=options.validate())
    batch_size, seed = int(recorded.get("batch_size") or 128), int(recorded.get("seed") or 0)
    done = precise_batchnorm(ckpt.model, shuffled_batches(splits.train, batch_size, seed), batches)
    return {**done, "data": data, "batch_size": batch_size}


def contract_checkpoint(
    ckpt: ckpt_io.Checkpoint,
    output: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    fold_bn: bool = False,
    dynamic_size: bool = False,
    require_expanded: bool = False,
    source: str | None = None,
    command: str | None = None,
    progress: Progress | None = None,
    precise_bn: int = 0,
    data: str | None = None,
) -> ContractResult:
    """Contract every expanded layer of ``ckpt``, check the compact model against the chains, fold
    BatchNorm (``fold_bn``, checked too) and write ``output``: a checkpoint, or an ONNX file checked
    against PyTorch with onnxruntime. A model without expanded layers is written as it is (with a
    warning), unless ``require_expanded``. ``precise_bn`` > 0 first recomputes every BatchNorm's
    running statistics over that many batches of ``data`` (:func:`recompute_batchnorm`)."""
    from .fold import fold_batchnorm
    from .rewrite import expanded_layers
    from .verify import compare_models

    progress = progress or _Silent()
    out = Path(output)
    source = source if source is not None else str(ckpt.path)
    to_onnx = out.suffix.lower() == ".onnx"
    if dynamic_size and not to_onnx:
        raise UsageError("--dynamic-size shapes an ONNX graph; give an -o ending in .onnx")
    if ckpt.arch is None and not to_onnx:
        raise UsageError(
            f"{source} holds a pickled model whose builder cannot be inferred; pass --arch to write a checkpoint"
        )
    layers = [p for p, _ in expanded_layers(ckpt.model)]
    if require_expanded and not layers:
        raise UnsupportedError(
            f"{source} has no expanded layer (never expanded, or already contracted) and --require-expanded "
            "was given; nothing was written"
        )
    shape = tuple(input_shape) if input_shape else ckpt.input_shape
    if not shape:
        raise UsageError(
            f"the input shape of {str(ckpt.path)!r} is not recorded and cannot be inferred; pass --input-shape C,H,W"
        )
    if precise_bn < 0 or (precise_bn and not data) or (data and not precise_bn):
        raise UsageError("--precise-bn N (N >= 1) and --data SPEC go together: the batches are SPEC's training images")
    recomputed = None
    if precise_bn:
        with progress.step(f"recomputing BatchNorm statistics over {precise_bn} batches of {data}"):
            ckpt = dataclasses.replace(ckpt, model=copy.deepcopy(ckpt.model))  # the caller's keeps its statistics
            recomputed = recompute_batchnorm(ckpt, data, precise_bn)
        if not recomputed["layers"]:
            progress.warn(f"{source} has no BatchNorm: --precise-bn changed nothing")
    reports: list = []
    if layers:
        compact, reports = contract_checked(ckpt, shape, atol, rtol, progress)
    else:
        compact = copy.deepcopy(ckpt.model)
        progress.warn(f"{source} is already compact (no expanded layers): nothing to contract; writing it as it is")
    folded: list = []
    if fold_bn:
        with progress.step("folding BatchNorm"):
            unfolded = compact
            compact, folded = fold_batchnorm(compact)
        with progress.step("checking the folded model"), running_model(shape, ckpt.input_shape):
            fold_reports = [
                compare_models(unfolded, compact, shape, dtype=d, atol=atol, rtol=rtol, kind="unfolded-vs-folded")
                for d in (torch.float64, torch.float32)
            ]
        reports += fold_reports
        if failed_reports(fold_reports):
            raise check_failed("folding BatchNorm changed the outputs; nothing was written", reports)
    if to_onnx:
        with progress.step(f"exporting {out} and checking it with onnxruntime"), running_model(shape, ckpt.input_shape):
            export_checked(
                compact,
                out,
                shape,
                reports,
                dynamic_size=dynamic_size,
                metadata=onnx_metadata(ckpt, shape, ckpt.folded_bn + folded, command),
                atol=atol,
                rtol=rtol,
            )
    else:
        with progress.step(f"writing {out}"):
            ckpt_io.save(
                compact,
                out,
                arch=ckpt.arch,
                arch_kwargs=ckpt.arch_kwargs,
                input_shape=shape,
                plan=ckpt.plan,
                parent_sha256=ckpt.sha256,
                command=command,
                folded_bn=ckpt.folded_bn + folded,
            )
    return ContractResult(
        source, out, compact, layers, folded, shape, dynamic_size, count_params(ckpt.model), count_params(compact),
        reports, recomputed,
    )  # fmt: skip
