"""``expandctl quantize``: INT8 static quantization with the accuracy cost measured, and a gate on it.

MODEL is an ONNX file, or a checkpoint that is first exported as ``export`` does (an expanded one is
contracted and checked first); the steps are :mod:`expandctl.quantize`'s. The main app registers
the command with ``app.command("quantize")``.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from .. import checkpoint as ckpt_io
from ..console import UI, kv_table
from ..errors import CheckFailed, UsageError
from ..shapes import data_mismatch, first_layer_channels, fmt_shape, onnx_dynamic_size, running_model
from .options import (
    ArchKwOpt,
    ArchOpt,
    AtolOpt,
    ChannelsOpt,
    DebugOpt,
    DownloadOpt,
    ImageSizeOpt,
    JsonOpt,
    QuietOpt,
    RtolOpt,
    ShapeOpt,
    TrustOpt,
    ValFractionOpt,
)
from .runtime import (
    contract_checked_cli,
    data_options,
    guard,
    input_shape_of,
    load_for_cli,
    onnx_metadata_of,
    onnx_shape,
)

__all__ = ["quantize", "result_rows"]


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


def quantize(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(metavar="MODEL", help="Float ONNX file, or a checkpoint (exported first).")],
    data: Annotated[
        str, typer.Option("--data", metavar="SPEC", help="Data spec: calibration (train) and scoring (val).")
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
    channels: ChannelsOpt = None,
    image_size: ImageSizeOpt = None,
    download: DownloadOpt = False,
    val_fraction: ValFractionOpt = None,
    input_shape: ShapeOpt = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """INT8 static quantization (onnxruntime, QDQ), scored against the float model on the validation split."""
    from ..data import load_data
    from ..export import export_onnx
    from ..quantize import METHODS, check_float_onnx, check_min_accuracy
    from ..quantize import quantize as run_quantize
    from ..rewrite import expanded_layers

    ui = UI("quantize", as_json, quiet, debug)
    with guard(ui):
        if calibration not in METHODS:
            raise UsageError(f"--calibration must be one of {', '.join(METHODS)}, not {calibration!r}")
        if calib_size < 1:
            raise UsageError(f"the calibration set is empty (--calib-size {calib_size}); give at least 1 image")
        if max_drop is not None and max_drop < 0:
            raise UsageError(f"--max-drop must be a number of percentage points >= 0, not {max_drop:g}")
        check_min_accuracy(min_accuracy)
        for flag, value in (("--batch-size", batch_size), ("--latency-batch", latency_batch)):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1")
        if latency_rounds < 1:
            raise UsageError("--latency-rounds must be at least 1")
        out = ckpt_io.check_output_path(output, [src], (".onnx",))
        opts = data_options(channels, image_size, None, None, download, val_fraction)
        with contextlib.ExitStack() as stack:
            if ckpt_io.sniff_format(src) == "onnx":
                check_float_onnx(src)
                shape = onnx_shape(src)
                sets = load_data(data, shape, augment=False, options=opts)
                given = tuple(sets.input_shape)
                if onnx_dynamic_size(src) and shape and len(shape) == len(given):  # any size, same channels
                    shape = (shape[0], *given[1:])
                if shape and tuple(shape) != given:
                    raise data_mismatch(None, src, shape, data, given)
                float_path = Path(src)
            else:
                ckpt = load_for_cli(ui, src, arch, arch_kwargs, trust_pickle)
                shape = input_shape_of(ckpt, input_shape)
                sets = load_data(data, shape, augment=False, options=opts)
                if tuple(shape) != tuple(sets.input_shape):  # before contracting and exporting
                    channels_in = first_layer_channels(ckpt.model)
                    raise data_mismatch(None, src, shape, data, sets.input_shape, channels_in)
                model = ckpt.model
                if list(expanded_layers(model)):
                    model, _ = contract_checked_cli(ui, ckpt, shape, atol, rtol)
                float_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="expandctl-"))) / "float.onnx"
                with ui.step("exporting the float model and checking it with onnxruntime"), running_model(shape):
                    try:
                        export_onnx(
                            model,
                            float_path,
                            shape,
                            metadata=onnx_metadata_of(ctx, ckpt, shape, ckpt.folded_bn),
                            atol=atol,
                            rtol=rtol,
                        )
                    except CheckFailed as e:
                        raise CheckFailed(f"{e}; nothing was written") from None
            step = f"calibrating on {calib_size} {data} images ({calibration}), scoring float and INT8"
            with ui.step(step):
                try:
                    result = run_quantize(
                        float_path,
                        out,
                        sets,
                        data,
                        calib_size=calib_size,
                        method=calibration,
                        seed=seed,
                        per_channel=per_channel,
                        max_drop=max_drop,
                        min_accuracy=min_accuracy,
                        batch_size=batch_size,
                        latency_batch=latency_batch,
                        latency_rounds=latency_rounds,
                    )
                except CheckFailed as e:
                    if getattr(e, "details", None):
                        ui.print(kv_table(result_rows(e.details), title=f"{src} -> INT8 (not written)"))
                    raise
        report = result.to_dict()
        ui.print(kv_table(result_rows(report), title=f"{src} -> {out}"))
        for note in result.notes:
            ui.note(f"note: {note}")
        ui.print(f"wrote {out} (input {fmt_shape(shape)})")
        ui.emit({"source": src, "data": data, "input_shape": list(shape) if shape else None, **report})
