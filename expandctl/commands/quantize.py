"""``expandctl quantize``: INT8 static quantization with the accuracy cost measured, and a gate on it.

MODEL is an ONNX file, or a checkpoint that is first exported as ``export`` does (an expanded one is
contracted and checked first); the steps are :func:`expandctl.workflows.quantize.quantize_model`'s.

Torch-free at import: the library is imported inside the command, so that ``--help`` loads no torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import UI, kv_table
from ..errors import CheckFailed
from .options import (
    ADAPTER_OPTIONS,
    LOAD_OPTIONS,
    OUTPUT_OPTIONS,
    AtolOpt,
    RtolOpt,
    ShapeOpt,
    data_help,
    with_options,
)
from .runtime import command_line, data_options, guard, load_for_cli, parse_shape, reports_on_failure

__all__ = ["quantize", "result_rows"]


#: The data adapter options quantize takes (no augmentation or subset: calibration and scoring see the data as is).
QUANTIZE_ADAPTERS = {k: ADAPTER_OPTIONS[k] for k in ("channels", "image_size", "download", "val_fraction")}
#: How a checkpoint is read and checked before it is exported.
CHECK_OPTIONS = {"input_shape": (ShapeOpt, None), "atol": (AtolOpt, None), "rtol": (RtolOpt, None)}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def result_rows(r: dict) -> list[tuple[str, str]]:
    """The human table of a :meth:`expandctl.quantize.QuantizeResult.to_dict`."""
    f, q, lat, cal = r["float_eval"], r["int8_eval"], r["latency"], r["calibration"]
    return [
        ("float accuracy / loss", f"{_pct(f['accuracy'])} / {f['loss']:.4f}"),
        ("INT8 accuracy / loss", f"{_pct(q['accuracy'])} / {q['loss']:.4f}"),
        ("accuracy drop", f"{r['drop_points']:+.2f} points ({f['samples']} validation images)"),
        ("max drop", "-" if r["max_drop"] is None else f"{r['max_drop']:g} points"),
        *([("min accuracy", f"{r['min_accuracy']:g}%")] if r.get("min_accuracy") is not None else []),
        (
            "latency (median)",
            f"float {lat['float_ms']:.3f} ms, INT8 {lat['int8_ms']:.3f} ms per batch of {lat['batch']} "
            f"({lat['rounds']} interleaved rounds, {lat['threads']} thread(s))",
        ),
        ("INT8 / float latency", f"{lat['ratio']:.2f} (medians), {lat['ratio_min']:.2f} (fastest rounds)"),
        ("file size", f"float {r['float_bytes']:,} B, INT8 {r['int8_bytes']:,} B"),
        ("calibration", f"{cal['size']} {cal['data']} training images, {cal['method']}, seed {cal['seed']}"),
        ("quantization", f"{r['quantization']['format']}; weights {r['quantization']['weights']}"),
    ]


@with_options(QUANTIZE_ADAPTERS, CHECK_OPTIONS, LOAD_OPTIONS, OUTPUT_OPTIONS)
def quantize(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(metavar="MODEL", help="Float ONNX file, or a checkpoint (exported first).")],
    data: Annotated[
        str, typer.Option("--data", metavar="SPEC", help=data_help("Calibration (train split) and scoring (val split)"))
    ],
    output: Annotated[str, typer.Option("-o", "--output", metavar="OUT", help="Output INT8 .onnx file.")],
    calib_size: Annotated[
        int, typer.Option("--calib-size", metavar="N", help="Calibration images from the training split (stratified).")
    ] = 512,
    calibration: Annotated[
        str, typer.Option("--calibration", metavar="minmax|entropy|percentile", help="Activation range method.")
    ] = "minmax",
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the calibration draw.")] = 0,
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop", metavar="POINTS", help="Fail (exit 1, nothing written) if accuracy drops by more points."
        ),
    ] = None,
    min_accuracy: Annotated[
        float | None,
        typer.Option(
            "--min-accuracy",
            metavar="PERCENT",
            help="Fail (exit 1, nothing written) if the INT8 accuracy is below PERCENT: refuses a model that "
            "never learned, which --max-drop passes.",
        ),
    ] = None,
    per_channel: Annotated[
        bool, typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel (default) or tensor.")
    ] = True,
    batch_size: Annotated[int, typer.Option(metavar="N", help="Images per scoring batch.")] = 256,
    latency_batch: Annotated[int, typer.Option(metavar="N", help="Batch size of the latency measurement.")] = 32,
    latency_rounds: Annotated[int, typer.Option(metavar="N", help="Interleaved timing rounds.")] = 30,
    **opts,
) -> None:
    """INT8 static quantization (onnxruntime, QDQ), scored against the float model on the validation split."""
    from ..shapes import fmt_shape
    from ..workflows.quantize import QuantizeOptions, quantize_model

    ui = UI("quantize", opts["as_json"], opts["quiet"], opts["debug"])
    with guard(ui):
        options = QuantizeOptions(
            data, output, calib_size, calibration, seed, max_drop, min_accuracy, per_channel, batch_size,
            latency_batch, latency_rounds, data_options(**{k: opts[k] for k in QUANTIZE_ADAPTERS}),
            parse_shape(opts["input_shape"]), opts["atol"], opts["rtol"],
        )  # fmt: skip

        def load(path: str):
            return load_for_cli(ui, path, opts["arch"], opts["arch_kwargs"], opts["trust_pickle"])

        try:
            with reports_on_failure(ui):
                report = quantize_model(src, options, load=load, command=command_line(ctx), progress=ui)
        except CheckFailed as e:
            if getattr(e, "details", None) and "float_eval" in e.details:  # the gate: the result, not written
                ui.print(kv_table(result_rows(e.details), title=f"{src} -> INT8 (not written)"))
            raise
        result = report.to_dict()
        ui.print(kv_table(result_rows(result), title=f"{src} -> {report.output}"))
        for note in report.notes:
            ui.note(f"note: {note}")
        ui.print(f"wrote {report.output} (input {fmt_shape(report.input_shape)})")
        ui.emit(result)
