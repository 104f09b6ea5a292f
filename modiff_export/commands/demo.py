"""`cli.py demo`: the end-to-end job (modiff_export/harness/demo.py) with a Markdown report."""
from __future__ import annotations

import time

import click


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="reports/demo", show_default=True,
              help="Report folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report folder.")
@click.option("--model", default="digits", show_default=True,
              help="'digits' or a folder holding a digits UNet (FD-digits needs 16x16 digits).")
@click.option("--num-samples", type=click.IntRange(2, 10_000), default=64, show_default=True,
              help="PyTorch samples per config (quality).")
@click.option("--parity-samples", type=click.IntRange(1, 10_000), default=16, show_default=True,
              help="Samples per config run on ONNX Runtime too.")
@click.option("--steps", type=click.IntRange(2, 1000), default=25, show_default=True, help="DDIM steps.")
@click.option("--seed", type=click.IntRange(0, 2**62), default=0, show_default=True, help="Noise seed.")
@click.option("--latency-batch", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--latency-rounds", type=click.IntRange(1, 1000), default=3, show_default=True)
@click.option("--calibration-samples", type=click.IntRange(1, 10_000), default=16, show_default=True,
              help="Calibration trajectories for the modiff-w8a4-static row (seed 1000, not the evaluation noise).")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="PyTorch and ONNX Runtime intra-op threads. 1 by default: this model's ops are tiny, and on a "
                   "shared 2-core machine a second thread that loses its core stalls every op (measured: PyTorch "
                   "UNet call 35 ms with 1 thread vs 1.8 s with 2 at load average 4).")
@click.option("--speed/--no-speed", default=True, show_default=True,
              help="Speed section on the CIFAR-10 DDPM architecture (random weights; OpenVINO and ONNX Runtime; "
                   "exports 3 graphs of a 35.7M-parameter UNet, a few minutes).")
@click.option("--caching/--no-caching", default=True, show_default=True,
              help="Caching section on the shipped DiT: block reuse (FP and MoDiff W8A4) beside diffusers' "
                   "TaylorSeerCache, from the same noise (about half a minute).")
@click.option("--peer-default/--no-peer-default", default=True, show_default=True,
              help="Also run quantize_static with its default choices (all ops, uint8 asymmetric) for a one-line note.")
def demo(**settings):
    """Export fp / ptq / MoDiff graphs at W8A8, W8A4, W8A3, W4A4 for the digits model, sample them on
    PyTorch and ONNX Runtime from the same noise, compare with ONNX Runtime's own static W8A8
    quantization, and write OUT/report.md with figures (quality, parity, BOPs, bytes, latency)."""
    from ..fsutil import check_writable
    from ..harness.demo import DemoSettings, run_demo

    check_writable(settings["out"], settings["overwrite"])
    t0 = time.time()
    path, phases = run_demo(DemoSettings(**settings))
    click.echo(f"wrote {path} in {(time.time() - t0) / 60:.1f} min ({phases.summary()})")


COMMANDS = [demo]
