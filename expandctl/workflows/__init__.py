"""The commands as library functions (one module per verb), under the thin CLI of :mod:`expandctl.commands`.

Each verb takes typed options and returns a result whose ``to_dict()`` is the command's ``--json`` object;
it never prints (``progress=`` receives its steps and warnings) and raises the typed errors of
:mod:`expandctl.errors`, worded in library terms.

>>> from expandctl import load_checkpoint
>>> from expandctl.workflows import contract_checkpoint, expand_checkpoint, verify_files
>>> r = expand_checkpoint(load_checkpoint("resnet.pt"), "resnet.expanded.pt", strategy="ck+fc", rate=4)
>>> c = contract_checkpoint(load_checkpoint("run/best.pt"), "compact.onnx")  # contract, check, export
>>> verify_files("run/best.pt", "compact.onnx").passed
"""

from ..progress import Progress
from ..verify import check_failed, contract_model_checked, failed_reports
from .checks import contract_checked, input_shape_for, load_checked, onnx_file_shape, onnx_metadata
from .contract import ContractResult, contract_checkpoint, recompute_batchnorm
from .evaluate import EvaluateOptions, EvaluateResult, evaluate_file
from .expand import ExpandResult, expand_checkpoint, fresh_checkpoint
from .export import ExportOptions, ExportResult, export_checkpoint
from .graph import GRAPH_SUFFIXES, GraphContractResult, contract_graph_checkpoint
from .inspect import InspectResult, inspect_file
from .verify import VerifyOptions, VerifyResult, verify_files

__all__ = [
    "Progress",
    "check_failed",
    "contract_checked",
    "contract_model_checked",
    "failed_reports",
    "onnx_metadata",
    "input_shape_for",
    "load_checked",
    "onnx_file_shape",
    "ContractResult",
    "contract_checkpoint",
    "recompute_batchnorm",
    "ExpandResult",
    "expand_checkpoint",
    "fresh_checkpoint",
    "GRAPH_SUFFIXES",
    "GraphContractResult",
    "contract_graph_checkpoint",
    "EvaluateOptions",
    "EvaluateResult",
    "evaluate_file",
    "ExportOptions",
    "ExportResult",
    "export_checkpoint",
    "InspectResult",
    "inspect_file",
    "VerifyOptions",
    "VerifyResult",
    "verify_files",
]
