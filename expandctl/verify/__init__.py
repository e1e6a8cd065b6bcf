"""Equivalence checks: torch vs torch (expanded vs contracted) and torch vs onnxruntime.

:mod:`.core` holds the report and what every check shares (and :func:`compare_models`);
:mod:`.contraction` the expanded-vs-contracted check and the rounding floor; :mod:`.onnx_check`
the check against onnxruntime.

Every check follows the traps listed in PAPER.md:

* models run on eval-mode deep copies (BatchNorm in train mode is the usual "outputs differ after
  conversion"); the caller's model is never touched;
* expanded layers run their factors one after the other (``"explicit"``), so a contracted model is
  checked against the chain itself, never against the same composition (``"fused"``) twice;
* the metric is the largest absolute difference, judged against ``atol + rtol * max|reference|``;
  never a signed sum of differences, which lets errors cancel;
* float64 separates algebra from rounding: a wrong padding or a dropped ``groups`` shows up as an
  error of order 1 there, rounding as one of order 1e-15;
* a contraction also passes when its error is within :data:`FLOOR_MULTIPLE` times the contracted
  model's own rounding floor (:func:`rounding_floor`): an ill-conditioned network (random BatchNorm
  statistics, deep stacks) can amplify float64 rounding a millionfold, so that an exact contraction
  misses a fixed ``rtol``; an algebra error stays many orders of magnitude above the floor.
"""

from .contraction import check_contraction, check_failed, contract_model_checked, failed_reports, rounding_floor
from .core import (
    DEFAULT_TOLERANCES,
    FLOOR_DRAWS,
    FLOOR_MULTIPLE,
    OutputCheck,
    Report,
    check_args,
    check_finite,
    compare_models,
    output_leaves,
)
from .onnx_check import compare_onnx

__all__ = [
    "check_failed",
    "contract_model_checked",
    "failed_reports",
    "DEFAULT_TOLERANCES",
    "OutputCheck",
    "Report",
    "compare_models",
    "check_contraction",
    "rounding_floor",
    "FLOOR_MULTIPLE",
    "FLOOR_DRAWS",
    "compare_onnx",
    "check_finite",
    "check_args",
    "output_leaves",
]
