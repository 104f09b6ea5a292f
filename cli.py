#!/usr/bin/env python
"""modiff-export command line: `python cli.py --help`. The group lives in modiff_export/__main__.py, so
`python -m modiff_export ...` is the same program (benchmarks use it for exports in a subprocess)."""
from modiff_export.__main__ import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    main()
