"""`cli.py build-engine`: TensorRT engines from an exported graph folder."""
from __future__ import annotations

from pathlib import Path

import click

from ..engine import PRECISIONS, EngineBuildOptions, build_engines


@click.command("build-engine")
@click.argument("graphs", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(PRECISIONS), default="int8", show_default=True,
              help="int8: explicitly quantized graphs, built strongly typed (their Q/DQ nodes decide). "
                   "int4: additionally INT4 weight-only block-quantized MatMul/Gemm weights (opset >= 21 "
                   "graphs that contain them). fp16: unquantized (mode 'fp') graphs only.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Engine folder to write [default: engines/<name of GRAPHS>].")
@click.option("--min-batch", type=int, default=1, show_default=True,
              help="Smallest UNet batch the engines accept. With classifier-free guidance the UNet batch is "
                   "twice the number of images.")
@click.option("--opt-batch", type=int, default=None, help="Batch TensorRT tunes for [default: --max-batch].")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Largest UNet batch the engines accept.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Shared tactic timing cache: read if it exists, updated after a successful build.")
@click.option("--workspace-gb", type=float, default=None, help="Builder workspace limit in GiB [default: TensorRT's].")
@click.option("--cuda-graph/--no-cuda-graph", default=False, show_default=True,
              help="Default for the trt runner: replay the step engine as a CUDA graph.")
@click.option("--overwrite", is_flag=True, help="Replace an existing engine folder.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def build_engine(graphs, precision, out, min_batch, opt_batch, max_batch, timing_cache, workspace_gb,
                 cuda_graph, overwrite, quiet):
    """Build TensorRT engines (prime.plan, step.plan) for the graphs in GRAPHS (a folder written by
    `cli.py export`), with one optimization profile over the batch axis taken from its manifest.

    Writes OUT/ with the plans, timing.cache, build.log, build.json and a copy of manifest.json,
    atomically: on any error nothing is left behind. Needs TensorRT and an NVIDIA GPU
    (pip install -e ".[tensorrt]").

    Example: python cli.py build-engine graphs/digits-modiff-w8a8 --precision int8 --max-batch 16
    """
    options = EngineBuildOptions(precision=precision, min_batch=min_batch,
                                 opt_batch=max_batch if opt_batch is None else opt_batch, max_batch=max_batch,
                                 workspace_gb=workspace_gb,
                                 timing_cache=None if timing_cache is None else str(timing_cache),
                                 cuda_graph=cuda_graph, overwrite=overwrite)
    out = out if out is not None else Path("engines") / Path(graphs).name
    path = build_engines(graphs, options, out, progress=not quiet)
    click.echo(f"engines written to {path}")


COMMANDS = [build_engine]
