"""What every equivalence check shares: the :class:`Report`, the default tolerances and the rounding-floor
margin, the random inputs, the eval-mode explicit copies, the output leaves and their running error;
:func:`compare_models` (torch vs torch) and :func:`check_finite`."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..errors import UsageError
from ..rewrite import set_forward

__all__ = [
    "DEFAULT_TOLERANCES",
    "FLOOR_MULTIPLE",
    "FLOOR_DRAWS",
    "OutputCheck",
    "Report",
    "compare_models",
    "check_finite",
    "check_args",
    "output_leaves",
]

#: ``{dtype: (atol, rtol)}``; an output passes iff ``max|a - b| <= atol + rtol * max|a|``.
#:
#: Measured by hand (torch 2.14 CPU; random init, BatchNorm with random running statistics, eval
#: mode, rate 4, explicit chain vs contracted model, N(0, 1) inputs, 2 x 2 samples, worst
#: ``max_rel`` over 1-9 seeds). "f64" expands and contracts in float64 (pure algebra); "f32 in
#: f64" is a float32 model contracted in float32 and run in float64 (the weights' rounding only):
#:
#: ============================  =======  ==========  =======  ==============================
#: model (input), strategy       f64      f32 in f64  f32      torch vs onnxruntime (float32)
#: ============================  =======  ==========  =======  ==============================
#: resnet18 (224), ck+fc         4.0e-15  4.5e-07     1.1e-06
#: resnet18 (224), cl+fc         3.6e-15  3.7e-07     9.6e-07  4.9e-07 (contracted model)
#: mobilenet_v2 (224), cl+fc     4.8e-15  4.9e-07     1.6e-06  5.1e-07 (contracted model)
#: SmallNet k=7 (32), ck+fc      9.0e-16  1.3e-07     3.5e-07  1.4e-07; 2.5e-07 expanded, fused
#: SmallNet k=7 (32), cl+fc      5.9e-16  1.1e-07     2.8e-07
#: ============================  =======  ==========  =======  ==============================
#:
#: ``rtol`` is set about 100x above the worst case: 1e-12 for float64 (200x; deeper nets add
#: rounding steps), 1e-4 for float32 and onnxruntime (60x and 150x). An algebra error is far
#: larger (two 3x3 factors each padded by 1 vs their 5x5 contraction: 0.35). ``atol`` is 100x below ``rtol``:
#: it only matters for an output whose largest magnitude is under 0.01, so that an all-zero
#: output can pass without letting small outputs pass on an absolute bound. Parameters stored in
#: float32 keep float32 rounding when run in float64, so the coarser of the compute dtype and the
#: parameters' dtype picks the row (see :func:`compare_models`).
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-14, 1e-12),
    torch.float32: (1e-6, 1e-4),
}

#: A contraction passes when its relative error is at most this multiple of the contracted model's
#: rounding floor (:func:`rounding_floor`), even above ``rtol``. Contraction rounds each merged tensor a
#: few times (branch sums, BatchNorm folding, a square root and a division), where the floor perturbs
#: each once by ``eps``-sized noise, hence a margin. On the branch sweep's ill-conditioned models the
#: exact contractions measured at most about 1.2x their float64 floor (docs/zoo.md); the algebra
#: errors injected in the tests (a kernel off by 1e-3 relative in one layer, a wrong padding, a dropped
#: bias; tests/test_trustworthy.py) land 4e4x (a 1e-3 kernel error on the test's cancelling model,
#: whose floor comes from elsewhere) to 4e14x above it.
FLOOR_MULTIPLE = 10.0
#: Noise draws of :func:`rounding_floor`: the floor is the largest movement over these.
FLOOR_DRAWS = 3


@dataclass
class OutputCheck:
    """One output leaf. ``max_rel = max|a-b| / max|a|`` (relative to the reference's largest
    magnitude; 0 when both are all zero). ``reason`` says why a check failed beyond the numbers:
    a shape mismatch, NaN/inf, a missing output, a runtime that refused the input."""

    name: str
    max_abs: float
    max_rel: float
    passed: bool
    reason: str | None = None
    #: The rounding floor of this output (``max_rel`` under rounding-sized noise); None: not measured.
    floor: float | None = None
    #: Passed only because ``max_rel <= FLOOR_MULTIPLE * floor`` (above ``atol + rtol * max|a|``).
    within_floor: bool = False


@dataclass
class Report:
    """The result of one comparison: settings and one :class:`OutputCheck` per output leaf."""

    kind: str
    dtype: str
    atol: float
    rtol: float
    seed: int
    samples: int
    batch: int
    input_shape: list[int]
    outputs: list[OutputCheck]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=math.nan, key=_nan_last)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=math.nan, key=_nan_last)

    @property
    def floor(self) -> float | None:
        """The largest rounding floor over the outputs (``None`` if not measured)."""
        floors = [o.floor for o in self.outputs if o.floor is not None]
        return max(floors) if floors else None

    @property
    def floor_ratio(self) -> float | None:
        """The worst ``max_rel / floor`` over the outputs (``None`` if no floor was measured)."""
        ratios = [_ratio(o.max_rel, o.floor) for o in self.outputs if o.floor is not None]
        return max(ratios, key=_nan_last) if ratios else None

    def summary(self) -> str:
        """One line: ``expanded-vs-contracted float64: passed (max_abs 1.2e-15, max_rel 3e-16; ...)``."""
        failed = [o for o in self.outputs if not o.passed]
        verdict = "passed" if self.passed else f"FAILED ({', '.join(o.name for o in failed) or 'no outputs'})"
        reasons = "".join(f"; {o.name}: {o.reason}" for o in failed if o.reason)
        return (
            f"{self.kind} {self.dtype}: {verdict} (max_abs {self.max_abs:.3g}, max_rel {self.max_rel:.3g}; "
            f"atol {self.atol:g}, rtol {self.rtol:g}){reasons}"
        )

    def to_dict(self) -> dict:
        """JSON-ready: NaN/inf metrics (not measurable, e.g. a shape mismatch) become ``None``."""
        d = asdict(self)
        d["passed"] = self.passed
        d["error"] = _finite(self.max_rel)
        d["floor"], d["floor_ratio"] = self.floor, _finite(self.floor_ratio)
        d["floor_multiple"] = FLOOR_MULTIPLE if self.floor is not None else None
        for o, check in zip(d["outputs"], self.outputs, strict=True):
            for k in ("max_abs", "max_rel"):
                o[k] = _finite(o[k])
            o["floor_ratio"] = _finite(_ratio(check.max_rel, check.floor)) if check.floor is not None else None
        return d


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _ratio(error: float, floor: float) -> float:
    if floor > 0:
        return error / floor
    return 0.0 if error == 0 else math.inf


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
def check_args(input_shape: Sequence[int], samples: int, batch: int) -> list[int]:
    try:
        shape = [int(s) for s in input_shape]
    except (TypeError, ValueError):
        raise UsageError(f"input shape must be a list of integers, got {input_shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"input shape must be positive sizes without the batch dimension, got {shape}")
    if samples < 1 or batch < 1:
        raise UsageError(f"samples and batch must be >= 1 (got samples={samples}, batch={batch})")
    return shape


def _param_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}


def _tolerances(dtype: torch.dtype, models: Sequence[nn.Module], atol, rtol) -> tuple[float, float, list]:
    """Defaults for the coarser of the compute dtype and the parameters' storage dtype."""
    notes = []
    if atol is not None and rtol is not None:
        return float(atol), float(rtol), notes
    stored = set().union(*(_param_dtypes(m) for m in models))
    key = max({dtype, *stored}, key=lambda d: torch.finfo(d).eps)
    if key != dtype:
        notes.append(f"parameters are stored in {_name(key)}: {_name(key)} default tolerances apply")
    if key not in DEFAULT_TOLERANCES:
        raise UsageError(f"no default tolerance for {_name(key)}; pass atol and rtol explicitly")
    d_atol, d_rtol = DEFAULT_TOLERANCES[key]
    return float(d_atol if atol is None else atol), float(d_rtol if rtol is None else rtol), notes


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _prepare(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An eval-mode copy in ``dtype`` whose expanded layers run their factors one by one."""
    copied = copy.deepcopy(model).eval().to(dtype)
    return set_forward(copied, "explicit")


def _device(model: nn.Module) -> torch.device:
    return next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))


def _inputs(shape: list[int], samples: int, batch: int, seed: int) -> list[torch.Tensor]:
    """Drawn in float64 so that every dtype sees the same inputs (rounded)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, *shape), generator=g, dtype=torch.float64) for _ in range(samples)]


def output_leaves(out, name: str = "output") -> list[tuple[str, torch.Tensor]]:
    """``[("output", t)]``, ``[("output.0", t0), ...]`` or ``[("output.logits", t), ...]``."""
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    if out is None:
        return []
    if isinstance(out, dict):
        return [leaf for k, v in out.items() for leaf in output_leaves(v, f"{name}.{k}")]
    if isinstance(out, (tuple, list)):
        keys = getattr(out, "_fields", range(len(out)))  # a namedtuple's fields name its leaves
        return [leaf for k, v in zip(keys, out, strict=True) for leaf in output_leaves(v, f"{name}.{k}")]
    raise UsageError(f"{name} is a {type(out).__name__}; only tensors (in tuples, lists, dicts) compare")


class _Accumulator:
    """Running ``max|a-b|`` and ``max|a|`` per output name, over all samples."""

    def __init__(self):
        self.stats: dict[str, list] = {}  # name -> [max_abs, max_ref, reason]

    def add(self, name: str, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        s = self.stats.setdefault(name, [0.0, 0.0, None])
        if s[2] is not None:
            return
        if a is None or b is None:
            s[2] = f"missing from the {'first' if a is None else 'second'} model's output"
        elif a.shape != b.shape:
            s[2] = f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        elif not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            which = "first" if not torch.isfinite(a).all() else "second"
            s[2] = f"NaN or inf in the {which} model's output"
        else:
            a, b = a.detach().cpu().double(), b.detach().cpu().double()
            if a.numel():
                s[0] = max(s[0], (a - b).abs().max().item())
                s[1] = max(s[1], a.abs().max().item())

    def add_all(self, a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> None:
        da, db = dict(a), dict(b)
        for name in [*da, *(n for n in db if n not in da)]:
            self.add(name, da.get(name), db.get(name))

    def fail(self, names: Sequence[str], reason: str) -> None:
        for name in names:
            s = self.stats.setdefault(name, [0.0, 0.0, None])
            s[2] = s[2] or reason

    def checks(self, atol: float, rtol: float) -> list[OutputCheck]:
        out = []
        for name, (max_abs, ref, reason) in self.stats.items():
            if reason is not None:
                out.append(OutputCheck(name, math.nan, math.nan, False, reason))
                continue
            rel = max_abs / ref if ref > 0 else (0.0 if max_abs == 0 else math.inf)
            out.append(OutputCheck(name, max_abs, rel, max_abs <= atol + rtol * ref))
        return out


@torch.no_grad()
def compare_models(
    a: nn.Module,
    b: nn.Module,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    samples: int = 4,
    batch: int = 2,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    kind: str = "torch-vs-torch",
) -> Report:
    """Run ``a`` (the reference) and ``b`` on ``samples`` random batches of ``(batch, *input_shape)``.

    Both run as eval-mode copies cast to ``dtype``, expanded layers in ``"explicit"`` mode. Default
    tolerances come from :data:`DEFAULT_TOLERANCES` for ``dtype``, or for the parameters' storage
    dtype when that is coarser (float32 weights cast to float64 still carry float32 rounding).
    """
    shape = check_args(input_shape, samples, batch)
    atol, rtol, notes = _tolerances(dtype, (a, b), atol, rtol)
    ma, mb = _prepare(a, dtype), _prepare(b, dtype)
    da, db = _device(ma), _device(mb)
    acc = _Accumulator()
    for x in _inputs(shape, samples, batch, seed):
        x = x.to(dtype)
        acc.add_all(output_leaves(ma(x.to(da))), output_leaves(mb(x.to(db))))
    return Report(kind, _name(dtype), atol, rtol, seed, samples, batch, shape, acc.checks(atol, rtol), notes)


def check_finite(model: nn.Module) -> None:
    """Raise :class:`UsageError` naming the first parameter or buffer holding NaN or inf.

    A diverged training run saves NaN weights; every later check would fail obscurely.
    """
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if isinstance(t, nn.parameter.UninitializedParameter) or not t.is_floating_point():
                continue
            bad = ~torch.isfinite(t.detach())
            if bad.any():
                n_nan = int(torch.isnan(t.detach()).sum())
                raise UsageError(
                    f"{kind} {name!r} has {int(bad.sum())} non-finite values ({n_nan} NaN) "
                    f"out of {t.numel()}; the model diverged or the file is corrupt"
                )
