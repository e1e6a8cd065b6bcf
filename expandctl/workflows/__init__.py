"""The commands as library functions (one module per verb), under the thin CLI of :mod:`expandctl.commands`.

Each verb takes typed options and returns a result whose ``to_dict()`` is the command's ``--json`` object;
it never prints (``progress=`` receives its steps and warnings) and raises the typed errors of
:mod:`expandctl.errors`, worded in library terms.

>>> from expandctl import load_checkpoint
>>> from expandctl.workflows import contract_checkpoint, expand_checkpoint
>>> r = expand_checkpoint(load_checkpoint("resnet.pt"), "resnet.expanded.pt", strategy="ck+fc", rate=4)
>>> c = contract_checkpoint(load_checkpoint("run/best.pt"), "compact.onnx")  # contract, check, export
"""

from .checks import Progress, check_failed, contract_checked, contract_model_checked, failed_reports, onnx_metadata
from .contract import ContractResult, contract_checkpoint, recompute_batchnorm
from .expand import ExpandResult, expand_checkpoint, fresh_checkpoint
from .graph import GRAPH_SUFFIXES, GraphContractResult, contract_graph_checkpoint

__all__ = [
    "Progress",
    "check_failed",
    "contract_checked",
    "contract_model_checked",
    "failed_reports",
    "onnx_metadata",
    "ContractResult",
    "contract_checkpoint",
    "recompute_batchnorm",
    "ExpandResult",
    "expand_checkpoint",
    "fresh_checkpoint",
    "GRAPH_SUFFIXES",
    "GraphContractResult",
    "contract_graph_checkpoint",
]
