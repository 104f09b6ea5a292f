"""CLI commands, one module per area. Each module exposes `COMMANDS`, a list of click commands."""
import importlib

# Add a module here when it gains commands; cli.py registers them in this order.
COMMAND_MODULES = ["sample", "export", "engine", "calibrate", "demo", "serve"]


def register(group) -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        for command in module.COMMANDS:
            group.add_command(command)
