"""modiff-export command line: `python cli.py --help` (or `python -m modiff_export --help`)."""
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
        except OSError as e:  # disk full, permission denied, ... while reading or writing
            where = f" ({e.filename})" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """MoDiff (modulated diffusion quantization): quantize a diffusion UNet, export ONNX graphs
    with explicit Q/DQ and cache I/O, calibrate, build TensorRT engines, and sample."""


register(cli)


def main() -> None:
    """Bad options are one `error:` line and exit code 1 as well (click alone prints usage, exit 2)."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        hint = f" (see: {e.ctx.command_path} --help)" if getattr(e, "ctx", None) else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
