"""User-facing errors: the CLI turns any of these into one line on stderr and exit code 1."""


class ModiffExportError(Exception):
    """Base class for every error caused by bad input (files, options, tensors, state)."""
