"""ExpandNets as a Lightning callback: train expanded, end the fit with the compact model, checked.

>>> from expandctl.integrations.lightning import ExpandNetsCallback
>>> trainer = L.Trainer(callbacks=[ExpandNetsCallback(strategy="ck+cl", export="model.onnx")])
>>> trainer.fit(module, train_loader, val_loader)   # `module` is compact again, and model.onnx exists

Like Lightning's ``ModelPruning`` and ``StochasticWeightAveraging``, the callback changes the
LightningModule in place at fixed points of the fit:

* ``setup`` (before the checkpoint is restored and before ``configure_optimizers``): the selected
  layers of the module's tree become expanded layers, so the optimizer holds the factors and a
  checkpoint written during training holds them too;
* training runs the fused forward (one composed kernel per layer and step);
* ``on_fit_end``: the expanded layers are contracted, the compact model is checked against the
  chains run explicitly (float64 and float32, as ``expandctl contract``), and the module is left
  compact; ``export=PATH`` then writes a checked ONNX file (global rank 0 only).

Resuming: ``trainer.fit(fresh_compact_module, ckpt_path="last.ckpt")`` with the same callback
expands the fresh module in ``setup`` (the plan depends only on the model and the settings, so the
structure matches the checkpoint's), Lightning loads the expanded weights and optimizer state into
it, and the fit ends compact as usual. The checkpoint records the layout (``checkpoint["expandctl"]``)
and a resume with other settings is refused, before any weight is loaded, with a sentence saying so.

Lightning is an optional dependency (``pip install 'expandctl[lightning]'``); nothing else in
expandctl imports this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch.nn as nn

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("expandctl.integrations.lightning needs Lightning: pip install 'expandctl[lightning]'") from e

from ..context import contract_and_check, copy_weights_into
from ..errors import UsageError
from ..export import export_onnx
from ..layers import INIT_MODES
from ..rewrite import _check_rate, contract, expand, expanded_layers, layout, parse_strategy

__all__ = ["ExpandNetsCallback"]

#: Where the layout goes in a Lightning checkpoint.
CHECKPOINT_KEY = "expandctl"


class ExpandNetsCallback(pl.Callback):
    """Expand the LightningModule for training, contract and check it at the end of ``fit``.

    ``strategy``, ``rate``, ``include``, ``exclude``, ``pointwise``, ``init`` and ``seed`` are
    :func:`expandctl.expand`'s (patterns match paths inside the LightningModule, e.g. ``"net.features.*"``).
    The check runs on inputs ``(batch, *input_shape)``: ``input_shape``, else the module's
    ``example_input_array``, else the shape of the first ``forward`` seen in training (or of the
    first training batch's inputs). ``export``:
    an ``.onnx`` path written after the check (``dynamic_size``: symbolic image size too).
    After the fit, ``reports`` holds the checks and ``export_report`` the ONNX one.
    """

    def __init__(
        self,
        strategy: str = "ck+fc",
        rate: float | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        export: str | Path | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        pointwise: bool = False,
        init: str = "scratch",
        seed: int | None = None,
        dynamic_size: bool = False,
        atol: float | None = None,
        rtol: float | None = None,
    ):
        self.strategy = "+".join(parse_strategy(strategy))  # a bad strategy fails here, not mid-fit
        self.rate = _check_rate(rate)
        if init not in INIT_MODES:
            raise UsageError(f"init must be one of {', '.join(INIT_MODES)}, got {init!r}")
        if export is not None and Path(export).suffix.lower() != ".onnx":
            raise UsageError(f"export= must be an .onnx path, got {str(export)!r}")
        self.include, self.exclude = tuple(include), tuple(exclude)
        self.export = Path(export) if export is not None else None
        self.input_shape = tuple(input_shape) if input_shape else None
        self.pointwise, self.init, self.seed = pointwise, init, seed
        self.dynamic_size, self.atol, self.rtol = dynamic_size, atol, rtol
        self.reports: list = []
        self.export_report = None
        self._seen_shape: tuple[int, ...] | None = None
        self._hook = self._load_hook = None

    # --- expand before the optimizers exist ---------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or list(expanded_layers(pl_module)):
            return  # validate/test/predict run the module as it is; a module already expanded stays so
        if type(pl_module).forward is pl.LightningModule.forward:
            raise UsageError(
                f"{type(pl_module).__name__} defines no forward(x): ExpandNetsCallback checks the contracted "
                "model through it at the end of the fit; define forward (e.g. return self.net(x))"
            )
        expand(
            pl_module, self.strategy, self.rate, init=self.init, include=self.include, exclude=self.exclude,
            pointwise=self.pointwise, seed=self.seed, inplace=True,
        )  # fmt: skip
        self._seen_shape = None
        self._remove_hook()
        self._hook = pl_module.register_forward_pre_hook(self._record_shape)
        self._load_hook = pl_module.register_load_state_dict_pre_hook(self._check_loaded)

    def _check_loaded(self, module, state_dict, prefix, *args) -> None:
        """Before a checkpoint's weights are loaded (resume): they must fit the layers expanded here,
        or the user hears why in one sentence rather than as a list of missing keys."""
        own = module.state_dict()
        for path in layout(module):
            head = f"{prefix}{path}."
            theirs = {k: tuple(v.shape) for k, v in state_dict.items() if k.startswith(head)}
            ours = {prefix + k: tuple(v.shape) for k, v in own.items() if (prefix + k).startswith(head)}
            if theirs != ours:
                diff = sorted(theirs.keys() ^ ours.keys()) or [k for k in ours if theirs[k] != ours[k]]
                raise UsageError(
                    f"the checkpoint's weights do not fit the layer {path!r} as ExpandNetsCallback(strategy="
                    f"{self.strategy!r}) expands it (first difference: {diff[0]}); resume with the callback "
                    "settings of the run that wrote the checkpoint (its 'expandctl' entry records its layout)"
                )

    def _record_shape(self, module, args) -> None:
        # A no-op once the shape is known, removed at the end of the fit: a hook that removed itself
        # would break a torch.compile'd module's graph at the first forward.
        if self._seen_shape is None and args and hasattr(args[0], "shape") and len(args[0].shape) > 1:
            self._seen_shape = tuple(int(n) for n in args[0].shape[1:])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._seen_shape is None:  # a training_step that calls self.net(x), not self(x): the batch's x
            x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
            if hasattr(x, "shape") and len(x.shape) > 1:
                self._seen_shape = tuple(x.shape[1:])

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._remove_load_hook()  # the checkpoint (if any) is loaded by now

    # --- checkpoints hold the expanded weights and their layout -------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "layout": layout(pl_module),
            "strategy": self.strategy,
            "input_shape": list(self._shape(pl_module) or []) or None,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY) or {}
        if self._seen_shape is None and saved.get("input_shape"):
            self._seen_shape = tuple(saved["input_shape"])

    # --- contract, check, export --------------------------------------------------------------------
    def _shape(self, pl_module) -> tuple[int, ...] | None:
        if self.input_shape:
            return self.input_shape
        example = getattr(pl_module, "example_input_array", None)
        if example is not None and hasattr(example, "shape"):
            return tuple(example.shape[1:])
        return self._seen_shape

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hook()
        if not list(expanded_layers(pl_module)):
            return
        shape = self._shape(pl_module)
        if shape is None:
            raise UsageError(
                "ExpandNetsCallback saw no forward pass and has no input shape to check the contraction on; "
                "pass input_shape= or set the module's example_input_array (the module is left expanded)"
            )
        with _no_trainer_copy(pl_module):
            compact, self.reports = contract_and_check(pl_module, shape, self.atol, self.rtol)
            contract(pl_module, inplace=True)  # the same algebra as the checked copy, on the module itself
            copy_weights_into(pl_module, compact)  # and exactly the checked weights
            if self.export is not None and trainer.is_global_zero:
                _, self.export_report = export_onnx(
                    pl_module, self.export, shape, dynamic_size=self.dynamic_size, atol=self.atol, rtol=self.rtol
                )

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._remove_hook()  # a fit that stopped on an exception leaves no hook behind
        self._remove_load_hook()


def _no_trainer_copy(module: nn.Module):
    """Deep copies (the check's, the export's) of a LightningModule without its trainer and loaders."""
    prevent = getattr(module, "_prevent_trainer_and_dataloaders_deepcopy", None)
    return prevent() if prevent is not None else contextlib.nullcontext()
