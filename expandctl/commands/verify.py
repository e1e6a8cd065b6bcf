"""``expandctl verify``: an expanded model against its contraction, or two files against each other.

Parses, calls the library and prints; registered in :mod:`expandctl.cli`."""

from __future__ import annotations

from typing import Annotated

import torch
import typer

from .. import checkpoint as ckpt_io
from ..console import UI
from ..errors import UsageError
from ..shapes import backend_message, fmt_shape, onnx_dynamic_size, run_once, running_model, second_size
from ..workflows import check_failed, failed_reports
from .options import ArchKwOpt, ArchOpt, AtolOpt, DebugOpt, JsonOpt, QuietOpt, RtolOpt, ShapeOpt, TrustOpt
from .runtime import guard, input_shape_of, load_for_cli, onnx_shape, parse_dtype, show_reports


def verify(
    ctx: typer.Context,
    a: Annotated[str, typer.Argument(metavar="A", help="Expanded checkpoint, or the reference checkpoint.")],
    b: Annotated[
        str | None, typer.Argument(metavar="B", help="Second checkpoint or ONNX file to compare with A.")
    ] = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    samples: Annotated[int, typer.Option(metavar="N", help="Random input batches.")] = 4,
    batch: Annotated[int, typer.Option(metavar="N", help="Batch size of each random input.")] = 2,
    dtype: Annotated[
        str | None,
        typer.Option(
            metavar="float32|float64",
            help="float32 or float64 (default: both for one file, float64 for two checkpoints, float32 for ONNX).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the random inputs.")] = 0,
    input_shape: ShapeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check that A's expanded chains equal their contraction, or that A and B compute the same outputs."""
    from ..export import check_onnx_sizes
    from ..rewrite import contract as contract_model
    from ..rewrite import expanded_layers
    from ..verify import check_contraction, compare_models

    ui = UI("verify", as_json, quiet, debug)
    with guard(ui):
        want = parse_dtype(dtype)
        fa = ckpt_io.sniff_format(a)
        fb = ckpt_io.sniff_format(b) if b is not None else None
        if fa == "onnx" and fb is not None and fb != "onnx":
            a, b, fa, fb = b, a, fb, fa  # the torch model is always the reference
        if fa == "onnx":
            raise UsageError(
                "verify needs a PyTorch checkpoint as reference; to check an ONNX file give it with its "
                "checkpoint "
                "(expandctl verify model.pt model.onnx)"
            )
        if fb == "onnx" and want == torch.float64:
            raise UsageError("onnxruntime runs the exported model in float32; drop --dtype float64")
        ckpt_a = load_for_cli(ui, a, arch, arch_kwargs, trust_pickle)
        ckpt_b = None
        if fb == "onnx" and input_shape is None:
            # The ONNX file says what it was exported with (graph input, else expandctl's metadata);
            # the checkpoint may record another shape its model also takes (contract --input-shape).
            shape = onnx_shape(b) or input_shape_of(ckpt_a, None)
        elif b is not None and input_shape is None and ckpt_a.input_shape is None:
            # A foreign pickle records no input shape; the second file (a .pt2 program) may.
            ckpt_b = load_for_cli(ui, b, arch, arch_kwargs, trust_pickle)
            shape = input_shape_of(ckpt_b, None)
        else:
            shape = input_shape_of(ckpt_a, input_shape)
        check = {"samples": samples, "batch": batch, "seed": seed, "atol": atol, "rtol": rtol}
        if b is None:
            if not list(expanded_layers(ckpt_a.model)):
                raise UsageError(
                    f"{a} has no expanded layers, so there is nothing to contract and compare; "
                    "give a second file "
                    f"(expandctl verify {a} other.pt|other.onnx)"
                )
            compact = contract_model(ckpt_a.model)
            with ui.step("comparing the expanded model with its contraction"), running_model(shape, ckpt_a.input_shape):
                reports = check_contraction(
                    ckpt_a.model,
                    compact,
                    shape,
                    dtypes=(want,) if want else (torch.float64, torch.float32),
                    **check,
                )
            title = f"{a}: expanded (explicit) vs contracted"
        elif fb == "onnx":
            recorded = ckpt_a.input_shape
            if input_shape is None and recorded and tuple(recorded) != tuple(shape):
                # The ONNX file fixes another shape than the checkpoint records: if the checkpoint's
                # model cannot even take it, the two files are two different models.
                try:
                    run_once(ckpt_a.model, shape, a)
                except UsageError as e:
                    raise UsageError(
                        f"{a} and {b} are two different models (input shapes differ: {b} takes "
                        f"{fmt_shape(shape)}, {a} records {fmt_shape(recorded)} and fails on "
                        f"{fmt_shape(shape)}: {backend_message(e.__cause__ or e)}); verify a checkpoint "
                        "against the ONNX file contracted or exported from it"
                    ) from None
            sizes = [shape, second_size(shape)] if onnx_dynamic_size(b) else [shape]  # a dynamic-size file: two
            with ui.step(f"comparing {a} with {b} in onnxruntime"), running_model(shape, ckpt_a.input_shape, a):
                reports = [check_onnx_sizes(ckpt_a.model, b, sizes, (batch,), atol, rtol, samples=samples, seed=seed)]
            title = f"{a} vs {b} (onnxruntime)"
        else:
            if ckpt_b is None:
                ckpt_b = load_for_cli(ui, b, arch, arch_kwargs, trust_pickle)
            sa, sb = ckpt_a.input_shape, ckpt_b.input_shape
            if input_shape is None and sa and sb and tuple(sa) != tuple(sb):
                raise UsageError(
                    f"{a} takes inputs of shape {fmt_shape(sa)} and {b} takes {fmt_shape(sb)} (as their files "
                    "record), so they are not two forms of one model; pass --input-shape to compare them anyway"
                )
            for path, model in ((a, ckpt_a.model), (b, ckpt_b.model)):
                run_once(model, shape, path)  # a model that cannot take the shape is exit 2, not a NaN check
            with ui.step(f"comparing {a} with {b}"), running_model(shape):
                reports = [compare_models(ckpt_a.model, ckpt_b.model, shape, dtype=want or torch.float64, **check)]
            title = f"{a} vs {b}"
        show_reports(ui, reports, title)
        details = {"files": [a, b] if b else [a], "input_shape": list(shape)}
        if failed_reports(reports):
            raise check_failed(
                "outputs differ beyond the tolerances: " + "; ".join(r.summary() for r in failed_reports(reports)),
                reports,
                **details,
            )
        ui.print("[green]passed[/green]")
        ui.emit({"passed": True, **details, "checks": [r.to_dict() for r in reports]})
