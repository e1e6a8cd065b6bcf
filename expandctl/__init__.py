"""expandctl: train compact CNNs as linear over-parameterised chains (ExpandNets), contract exactly.

>>> import expandctl
>>> big = expandctl.expand(model, strategy="ck+fc", rate=4)
>>> small = expandctl.contract(big)
"""

__version__ = "0.1.0"

from .checkpoint import Checkpoint, load, load_checkpoint, save  # noqa: E402
from .errors import (  # noqa: E402
    AlreadyExpandedError,
    CheckFailed,
    ExpandctlError,
    NothingToExpandError,
    PreserveFitError,
    UnsafeInputError,
    UnsupportedError,
    UsageError,
)
from .layers import (  # noqa: E402
    EXPANSIONS,
    ExpandedConv,
    ExpandedConvCK,
    ExpandedConvCL,
    ExpandedLayer,
    ExpandedLinear,
    register_expansion,
)
from .rewrite import (  # noqa: E402
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
