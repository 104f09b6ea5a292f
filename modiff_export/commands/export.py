"""`export` (ONNX graphs + manifest) and `check` (what a TensorRT build relies on, on the CPU)."""
from __future__ import annotations

import time
from pathlib import Path

import click

from .options import QUANT


@click.command("export")
@click.option("--model", default="digits", show_default=True,
              help="'digits' (embedded) or a local diffusers UNet/pipeline folder.")
@QUANT.options()
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="calibration/<name>.json from `cli.py calibrate`: its weights (clipping; GPTQ rounding with "
                   "the recommended recipe) always, its static delta scales with --scale-mode static.")
@click.option("--cache-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="dtype of the cache I/O tensors.")
@click.option("--target", type=click.Choice(["trt", "ort"]), default="trt", show_default=True,
              help="trt: explicit Q/DQ graphs (TensorRT, OpenVINO). ort: rewritten for ONNX Runtime CPU "
                   "(modiff_export/export/ort_variant.py; same results up to float rounding).")
@click.option("--opset", type=click.IntRange(13, 21), default=17, show_default=True, help="ONNX opset.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: graphs/<model>-<config>].")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing output folder (atomically: old or new, never half).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(model, calibration, cache_dtype, target, opset, out, overwrite, quiet, **quant):
    """Export a MoDiff-quantized UNet as ONNX: prime.onnx (fills the caches), step.onnx (consumes and
    returns them), manifest.json (the I/O contract). Quantization is explicit QuantizeLinear /
    DequantizeLinear with constant scales, as TensorRT requires."""
    from ..export.trace import export_model
    from ..fsutil import check_writable
    from ..models import load_model

    loaded = load_model(model)
    config = QUANT.config(quant, model=loaded)
    out = Path(out or f"graphs/{loaded.name}-{config.tag}{'-static' if config.scale_mode == 'static' else ''}")
    check_writable(out, overwrite)  # before the (long) export
    from_cal = {}
    if calibration is not None:  # weights (clips, GPTQ) always; delta scales with --scale-mode static
        from ..calibration.file import load_calibration

        from_cal = load_calibration(calibration, loaded.content_hash, config).export_kwargs(config)
    t0 = time.perf_counter()
    manifest = export_model(loaded, config, out, cache_dtype=cache_dtype, opset=opset, target=target,
                            overwrite=overwrite, progress=not quiet, **from_cal)
    graphs = list(manifest.files)
    click.echo(f"wrote {out}/ ({', '.join(graphs)}, manifest.json): {len(manifest.caches)} caches, "
               f"{sum((out / g).stat().st_size for g in graphs) / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")


@click.command("check")
@click.argument("graphs", type=click.Path())
def check(graphs):
    """Verify, without TensorRT, what a TensorRT build of GRAPHS relies on: constant Q/DQ scales with
    zero points of 0, every quantized Conv/Gemm/MatMul reading dequantized int8 weights (and, in
    quantized-activation graphs, dequantized activations), only ops the ONNX-TensorRT parser supports,
    and graph I/O equal to manifest.json. Exits 1 listing the offending nodes."""
    from ..export.check import check_folder

    report = check_folder(graphs)
    for role, s in report.stats.items():
        click.echo(f"{role}: {s['nodes']} nodes, {s['quantized_linear']} quantized Conv/Gemm/MatMul, {s['qdq']} Q/DQ")
    if not report.ok:
        for p in report.problems:  # the report (stdout); stderr gets the one error line
            click.echo(f"FAIL {p}")
        raise SystemExit(f"error: {graphs}: {len(report.problems)} problem(s) a TensorRT build would hit "
                         f"(listed above); the first: {report.problems[0]}")
    click.echo(f"OK {graphs}: ready for build-engine")


COMMANDS = [export, check]
