"""expandctl: train compact CNNs as linear over-parameterised chains (ExpandNets), contract exactly.

>>> import expandctl
>>> big = expandctl.expand(model, strategy="ck+fc", rate=4)
>>> small = expandctl.contract(big)
"""

from ._version import __version__
from .checkpoint import Checkpoint, load, load_checkpoint, save
from .context import ExpandedTraining, expanded
from .errors import (
    AlreadyExpandedError,
    CheckFailed,
    ExpandctlError,
    NothingToExpandError,
    PreserveFitError,
    UnsafeInputError,
    UnsupportedError,
    UsageError,
)
from .layers import (
    EXPANSIONS,
    ExpandedConv,
    ExpandedConvCK,
    ExpandedConvCL,
    ExpandedLayer,
    ExpandedLinear,
    register_expansion,
)
from .rewrite import (
    Plan,
    PlanEntry,
    apply_layout,
    contract,
    expand,
    expanded_layers,
    layout,
    plan,
    set_forward,
)

__all__ = [
    "__version__",
    "plan",
    "expanded",
    "ExpandedTraining",
    "expand",
    "contract",
    "set_forward",
    "expanded_layers",
    "layout",
    "apply_layout",
    "Plan",
    "PlanEntry",
    "ExpandedLayer",
    "ExpandedLinear",
    "ExpandedConv",
    "ExpandedConvCL",
    "ExpandedConvCK",
    "EXPANSIONS",
    "register_expansion",
    "ExpandctlError",
    "UsageError",
    "CheckFailed",
    "UnsafeInputError",
    "UnsupportedError",
    "NothingToExpandError",
    "AlreadyExpandedError",
    "PreserveFitError",
    "load",
    "save",
    "Checkpoint",
    "load_checkpoint",
]
