"""The expandctl checkpoint format, architecture specs, and safe loading of foreign files.

An expandctl checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` reads back
(or a safetensors file whose metadata key ``"expandctl"`` holds the same header as JSON)::

    {"format": "expandctl", "format_version": 1,
     "arch": {"spec": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}},
     "input_shape": [3, 224, 224],
     "layout": {"conv1": {"kind": "ck", "hidden": [12, 256, 256]}, ...},   # rewrite.layout()
     "plan": {...} or None,                                                 # Plan.to_dict()
     "folded_bn": [{"conv": "conv1", "bn": "bn1"}, ...],                    # only after --fold-bn
     "state_dict": {...}, "provenance": {...}, "extra": {...}}

One module per concern:

* :mod:`.format`: the :class:`Checkpoint` record, :func:`save`, :func:`load_checkpoint`;
* :mod:`.rebuild`: the model from its recipe (architecture, layout, folded BatchNorm, added biases),
  never from pickled code, and whether given weights fit it;
* :mod:`.unpickle`: reading foreign torch files (state dicts, pickled ``nn.Module``) without running
  code from them;
* :mod:`.infer`: the architecture and input shape of a model whose file does not record them;
* :mod:`.describe`: what ``inspect`` shows of ONNX files and plain state dicts;
* :mod:`.files`: atomic writes, hashes, format sniffing, output-path checks.
"""

from .describe import describe_onnx, describe_state_dict
from .files import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, atomic_write, check_output_path, sha256_file, sniff_format
from .format import FORMAT, FORMAT_VERSION, Checkpoint, NeedsArchError, load, load_checkpoint, save
from .infer import infer_arch, infer_input_shape

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TORCH_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
    "Checkpoint",
    "NeedsArchError",
    "atomic_write",
    "sha256_file",
    "sniff_format",
    "load_checkpoint",
    "load",
    "save",
    "infer_arch",
    "infer_input_shape",
    "check_output_path",
    "describe_onnx",
    "describe_state_dict",
]
