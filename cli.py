#!/usr/bin/env python
"""modiff-export command line: `python cli.py --help`."""
import sys

import click

from modiff_export.commands import register
from modiff_export.errors import ModiffExportError


class _Group(click.Group):
    """Turns every user-facing error into one clear line and exit code 1 (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ModiffExportError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """MoDiff (modulated diffusion quantization): quantize a diffusion UNet, export ONNX graphs
    with explicit Q/DQ and cache I/O, calibrate, build TensorRT engines, and sample."""


register(cli)

if __name__ == "__main__":
    cli()
