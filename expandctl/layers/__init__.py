"""Expanded layers: what stands in, during training, for one ``nn.Linear`` / ``nn.ConvNd``.

One module per family, every class registered under its strategy name (:data:`EXPANSIONS`):

* :mod:`.linear`, :mod:`.conv`, :mod:`.transposed` -- ExpandNets' serial chains ``fc``, ``cl``, ``ck``;
* :mod:`.branches` -- the parallel-branch re-parameterisations ``acb`` (ACNet), ``rep`` (RepVGG),
  ``dbb`` (Diverse Branch Block) and ``orepa`` (OREPA's linear form).

:mod:`.base` holds what every kind shares (the two verbs ``equivalent`` / ``contract``, the forward
modes, the registry); :mod:`.hosts` decides which subclasses of torch's layers can be expanded;
:mod:`.preserve` builds function-preserving starts. Adding a strategy is one module registering a
class, imported below; the CLI help and messages read the registry.
"""

from .base import (
    EXPANSIONS,
    FORWARD_MODES,
    INIT_MODES,
    PRESERVE_TOL,
    ChainLayer,
    ComposeOnce,
    ExpandedLayer,
    expansion_for,
    factor_parameters,
    register_expansion,
    strategy_names,
)
from .hosts import fused_only_reason

# isort: off
# Registration order is the order of the CLI help: ExpandNets' chains, then the branch kinds.
from .linear import ExpandedLinear
from .conv import ExpandedConv, ExpandedConvCK, ExpandedConvCL, input_padding
from .transposed import ExpandedConvTranspose, ExpandedConvTransposeCK, ExpandedConvTransposeCL
from .branches import ACBConv, BranchedConv, DBBConv, OREPAConv, RepConv
# isort: on

__all__ = [
    "ExpandedLayer",
    "ChainLayer",
    "ExpandedLinear",
    "ExpandedConv",
    "ExpandedConvCL",
    "ExpandedConvCK",
    "ExpandedConvTranspose",
    "ExpandedConvTransposeCL",
    "ExpandedConvTransposeCK",
    "BranchedConv",
    "ACBConv",
    "RepConv",
    "DBBConv",
    "OREPAConv",
    "expansion_for",
    "strategy_names",
    "factor_parameters",
    "fused_only_reason",
    "input_padding",
    "FORWARD_MODES",
    "INIT_MODES",
    "PRESERVE_TOL",
    "EXPANSIONS",
    "register_expansion",
    "ComposeOnce",
]
