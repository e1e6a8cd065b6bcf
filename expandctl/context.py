"""Train expanded inside any loop, get the compact weights back in the model you hold.

>>> with expandctl.expanded(model, strategy="ck+cl+fc", rate=2) as big:
...     opt = torch.optim.SGD(big.parameters(), lr=0.05)
...     for x, y in loader:
...         ...  # train `big`
>>> model(x)  # the same object, now computing what the trained `big` computed

On a normal exit the expanded model is contracted, checked against its chains run explicitly
(float64 and float32, as ``expandctl contract`` checks) and the compact weights are copied into
``model``'s own parameters and buffers: same object, same submodules, same parameter objects, so an
optimizer, an EMA copy or a hook that holds them stays valid. A failed check raises
:class:`~expandctl.errors.CheckFailed` and leaves ``model`` as it was; so does any exception inside
the block (``KeyboardInterrupt`` included), which propagates. Like torch.ao's prepare / convert,
one model is trained one way and shipped another, but here the shipped weights land in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .errors import UnsupportedError, UsageError
from .rewrite import expand, expanded_layers
from .shapes import fmt_shape
from .verify import contract_model_checked

__all__ = ["expanded", "ExpandedTraining", "contract_and_check", "copy_weights_into"]


def contract_and_check(big: nn.Module, input_shape: Sequence[int], atol=None, rtol=None) -> tuple[nn.Module, list]:
    """``(a contracted copy of big, the expanded-vs-contracted reports)``; raises
    :class:`~expandctl.errors.CheckFailed` (carrying the reports) when the check fails."""
    return contract_model_checked(
        big, input_shape, atol, rtol, what="the expanded model", written="the compact weights were not written back"
    )


def copy_weights_into(model: nn.Module, compact: nn.Module) -> None:
    """Copy ``compact``'s parameters and buffers into ``model``'s tensors (no module or parameter is
    replaced). Everything is compared before anything is written, so a mismatch changes nothing."""
    dst, src = model.state_dict(keep_vars=True), compact.state_dict(keep_vars=True)
    missing, extra = sorted(dst.keys() - src.keys()), sorted(src.keys() - dst.keys())
    if missing or extra:
        raise UnsupportedError(
            "the contracted model does not have the original's structure "
            f"(only in the original: {', '.join(missing[:4]) or 'none'}; "
            f"only in the contracted: {', '.join(extra[:4]) or 'none'}), so its weights cannot be written "
            "into it in place; contract the expanded model with expandctl.contract instead"
        )
    shapes = [k for k in dst if dst[k] is not None and tuple(dst[k].shape) != tuple(src[k].shape)]
    if shapes:
        k = shapes[0]
        raise UnsupportedError(
            f"{k} is {fmt_shape(tuple(dst[k].shape))} in the original and {fmt_shape(tuple(src[k].shape))} "
            "contracted; nothing was written back"
        )
    with torch.no_grad():
        for k, t in dst.items():
            if t is not None:
                t.copy_(src[k])


class ExpandedTraining:
    """What :func:`expanded` returns: a context manager yielding the expanded model. After a normal
    exit ``reports`` holds the contraction checks and ``input_shape`` the shape they ran on."""

    def __init__(
        self,
        model: nn.Module,
        strategy: str = "ck+fc",
        rate: float | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        **expand_options,
    ):
        if "inplace" in expand_options:
            raise UsageError("expanded() always trains a copy and writes the result back; drop inplace=")
        if list(expanded_layers(model)):
            raise UsageError("expanded() takes a compact model; this one already has expanded layers")
        self.model = model
        self.strategy, self.rate, self.options = strategy, rate, expand_options
        self.input_shape = tuple(input_shape) if input_shape else None
        self.atol, self.rtol = atol, rtol
        self.big: nn.Module | None = None
        self.reports: list = []
        self._hook = None

    def __enter__(self) -> nn.Module:
        self.big = expand(self.model, self.strategy, self.rate, **self.options)  # a copy: model untouched
        if self.input_shape is None:
            self._hook = self.big.register_forward_pre_hook(self._record_shape)
        return self.big

    def _record_shape(self, module, args) -> None:
        # Stays registered until the block ends (a no-op once the shape is known): a hook that removes
        # itself would break torch.compile's graph at the first forward.
        if self.input_shape is None and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 1:
            self.input_shape = tuple(int(n) for n in args[0].shape[1:])

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._hook is not None:
            self._hook.remove()
        if exc_type is not None:
            return False  # the model was never touched; the exception propagates
        if self.input_shape is None:
            raise UsageError(
                "expanded() saw no forward pass inside the block and was given no input_shape=, so the "
                "contraction cannot be checked; the trained model is still the one the block yielded"
            )
        compact, self.reports = contract_and_check(self.big, self.input_shape, self.atol, self.rtol)
        copy_weights_into(self.model, compact)
        return False


def expanded(model: nn.Module, strategy: str = "ck+fc", rate: float | None = None, **options) -> ExpandedTraining:
    """A context manager that yields ``expand(model, strategy, rate, **expand_options)`` and, on a
    normal exit, contracts it, checks it and writes the compact weights into ``model`` in place.

    ``options`` (keywords, as :class:`ExpandedTraining` takes them): ``input_shape``, ``atol``, ``rtol``
    and ``expand_options``, :func:`expandctl.expand`'s (``include``, ``exclude``, ``init``, ``forward``,
    ``pointwise``, ``seed``). The check runs on inputs of ``(batch, *input_shape)``; without
    ``input_shape`` the shape of the first forward inside the block is used. ``atol`` / ``rtol``
    override the check's tolerances (:data:`expandctl.verify.DEFAULT_TOLERANCES`)."""
    return ExpandedTraining(model, strategy, rate, **options)
