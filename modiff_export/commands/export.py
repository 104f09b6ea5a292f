"""`export` (ONNX graphs + manifest) and `check` (what a TensorRT build relies on, on the CPU)."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ..config import GRANULARITIES, MODES, SCALE_MODES, QuantConfig


@click.command("export")
@click.option("--model", default="digits", show_default=True, help="'digits' (embedded) or a local diffusers UNet/pipeline folder.")
@click.option("--mode", type=click.Choice(MODES), default="modiff", show_default=True,
              help="fp: no quantization; ptq: plain Q/DQ of inputs (baseline); modiff: quantize input deltas, caches as graph I/O.")
@click.option("--weight-bits", type=click.IntRange(2, 8), default=8, show_default=True, help="Weight bits (symmetric, per output channel; int8 containers).")
@click.option("--act-bits", type=click.IntRange(2, 8), default=8, show_default=True, help="Activation (delta) bits; < 8 are exact inside int8 via Clip.")
@click.option("--scale-mode", type=click.Choice(SCALE_MODES), default="dynamic", show_default=True,
              help="dynamic: absmax in-graph; static: scales from --calibration.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="sample", show_default=True,
              help="One activation scale per sample (batch-invariant) or per tensor (paper).")
@click.option("--no-error-compensation", is_flag=True, help="Ablation: a_hat = x instead of a_hat + Q(delta).")
@click.option("--keyframe-interval", type=click.IntRange(1), default=None, help="Re-run the full-precision prime graph every K steps.")
@click.option("--skip-layers", multiple=True, metavar="PATTERN", help="Leave layers matching this fnmatch pattern in full precision (repeatable).")
@click.option("--int8-layers", multiple=True, metavar="PATTERN", help="Keep layers matching this pattern at W8A8 (repeatable).")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None, help="calibration/<name>.json from `cli.py calibrate` (static scales, weight clipping).")
@click.option("--cache-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True, help="dtype of the cache I/O tensors.")
@click.option("--target", type=click.Choice(["trt", "ort"]), default="trt", show_default=True,
              help="trt: explicit Q/DQ graphs (TensorRT). ort: then rewrite them for ONNX Runtime CPU "
                   "(modiff_export/ort_variant.py; same results up to float rounding).")
@click.option("--weight-block-size", type=click.IntRange(2), default=None, metavar="N",
              help="INT4 block quantization of Linear weights for TensorRT weight-only INT4 (N inputs per scale, "
                   "e.g. 16..128); needs --weight-bits <= 4 and --opset 21.")
@click.option("--opset", type=click.IntRange(13, 21), default=17, show_default=True, help="ONNX opset.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output folder [default: graphs/<model>-<config>].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(model, mode, weight_bits, act_bits, scale_mode, granularity, no_error_compensation, keyframe_interval,
           skip_layers, int8_layers, calibration, cache_dtype, target, weight_block_size, opset, out, overwrite, quiet):
    """Export a MoDiff-quantized UNet as ONNX: prime.onnx (fills the caches), step.onnx (consumes and
    returns them), manifest.json (the I/O contract). Quantization is explicit QuantizeLinear /
    DequantizeLinear with constant scales, as TensorRT requires."""
    from ..export import ModelInfo, export_model
    from ..models import load_model

    config = QuantConfig(mode=mode, weight_bits=weight_bits, act_bits=act_bits, scale_mode=scale_mode,
                         granularity=granularity, error_compensation=not no_error_compensation,
                         keyframe_interval=keyframe_interval, skip_layers=tuple(skip_layers), int8_layers=tuple(int8_layers),
                         weight_block_size=weight_block_size)
    loaded = load_model(model)
    scales = clips = None
    if calibration is not None:
        from ..calibration import load_calibration

        cal = load_calibration(calibration, loaded.content_hash, config)
        scales, clips = cal.export_scales(), cal.weight_clips
    out = Path(out or f"graphs/{loaded.name}-{config.tag}{'-static' if scale_mode == 'static' else ''}")
    info = ModelInfo(loaded.name, loaded.content_hash, loaded.sample_shape, loaded.cross_attention_dim,
                     loaded.encoder_seq_len, loaded.scheduler_config)
    t0 = time.perf_counter()
    manifest = export_model(loaded.unet, info, config, out, scales=scales, weight_clips=clips, cache_dtype=cache_dtype,
                            opset=opset, overwrite=overwrite, progress=not quiet)
    if target == "ort":
        from ..ort_variant import apply_to_folder

        apply_to_folder(out)
    graphs = [g for g in manifest["graphs"].values() if g]
    click.echo(f"wrote {out}/ ({', '.join(graphs)}, manifest.json): {len(manifest['caches'])} caches, "
               f"{sum((out / g).stat().st_size for g in graphs) / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")


@click.command("check")
@click.argument("graphs", type=click.Path())
def check(graphs):
    """Verify, without TensorRT, what a TensorRT build of GRAPHS relies on: constant Q/DQ scales with
    zero points of 0, every quantized Conv/Gemm/MatMul reading dequantized int8 weights (and, in
    quantized-activation graphs, dequantized activations), only ops the ONNX-TensorRT parser supports,
    and graph I/O equal to manifest.json. Exits 1 listing the offending nodes."""
    from ..check import check_folder

    report = check_folder(graphs)
    for role, s in report.stats.items():
        click.echo(f"{role}: {s['nodes']} nodes, {s['quantized_linear']} quantized Conv/Gemm/MatMul, {s['qdq']} Q/DQ")
    if not report.ok:
        for p in report.problems:
            click.echo(f"FAIL {p}", err=True)
        raise SystemExit(f"error: {graphs}: {len(report.problems)} problem(s) a TensorRT build would hit")
    click.echo(f"OK {graphs}: ready for build-engine")


COMMANDS = [export, check]
