"""``expandctl expand`` as a library function: plan -> expand -> save. Never prints.

>>> from expandctl import load_checkpoint
>>> from expandctl.workflows import expand_checkpoint
>>> r = expand_checkpoint(load_checkpoint("resnet.pt"), "resnet.expanded.pt", strategy="ck+fc", rate=4)
>>> r.params_before, r.params_after
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import checkpoint as ckpt_io
from ..console import fmt_rate
from ..errors import UsageError
from ..layers import INIT_MODES
from ..models import build_arch, resolve_arch
from ..progress import Progress, Silent
from ..rewrite import expand as expand_model
from ..rewrite import expanded_layers
from ..rewrite import plan as make_plan
from ..shapes import fmt_shape, run_once
from ..sizes import check_expanded_size, count_params
from .checks import save_derived


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
    progress = progress or Silent()
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
    progress = progress or Silent()
    if init not in INIT_MODES:
        raise UsageError(f"init must be one of {', '.join(INIT_MODES)}, got {init!r}", option="init")
    if output is None and not dry_run:
        raise UsageError("give an output path to write the expanded checkpoint to", option="output")
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
        err = plan.nothing_selected("run with dry_run to see why each was left alone")
        err.option = "dry_run"
        raise err
    if ckpt.arch is None:
        raise UsageError(
            f"{source} holds a pickled {ckpt.provenance.get('pickled_class', 'model')} "
            "whose builder cannot be "
            "inferred, and an expandctl checkpoint must be rebuildable; pass arch (and arch_kwargs)",
            option=("arch", "arch_kwargs"),
        )
    out = Path(output)
    with progress.step(f"expanding {len(plan.expanded)} layers ({plan.strategy}, {fmt_rate(plan.rate)})"):
        expanded = expand_model(
            ckpt.model, strategy, rate, init=init, include=include, exclude=exclude, pointwise=pointwise, seed=seed
        )
    residuals = {path: layer.fit_residual for path, layer in expanded_layers(expanded)}
    for entry in plan.expanded:
        entry.fit_residual = residuals.get(entry.path)
    plan_dict = plan.to_dict()
    if ckpt.plan and ckpt.layout:  # expanding a model that is already partly expanded
        plan_dict["previous"] = ckpt.plan
    save_derived(expanded, out, ckpt, shape, plan_dict, command, ckpt.folded_bn, progress)
    result.plan_dict, result.output, result.model = plan_dict, out, expanded
    result.params_after = count_params(expanded)
    if shape is None:
        result.warnings.append(
            "the input shape is unknown; pass --input-shape to contract, verify or export this checkpoint"
        )
    return result
