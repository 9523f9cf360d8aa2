"""The ``tensorfold`` command line.

Commands live in their own modules (``tensorfold.cli.<name>``), each with a ``register(app)`` function;
this module only builds the app and registers the modules that exist, in a fixed order. Importing it
does not import torch, so ``tensorfold --help`` is quick.

Run ``tensorfold --help`` or ``python -m tensorfold --help``.
"""

from __future__ import annotations

import importlib
import importlib.util

import typer

from tensorfold import __version__
from tensorfold.cli.common import DEBUG_ENV, TensorfoldGroup

# Each name is a module tensorfold.cli.<name> with register(app); missing ones are skipped.
COMMAND_MODULES = ("decompose", "compress", "sweep", "rank", "export")

app = typer.Typer(
    name="tensorfold",
    cls=TensorfoldGroup,
    help="Tensor decompositions and neural-network compression on PyTorch.",
    epilog=(
        "Examples:\n\n"
        "  tensorfold decompose data.npy --method cp --rank 10 --out cp10.safetensors\n\n"
        "  tensorfold info cp10.safetensors\n\n"
        "Errors print one line 'error: ...' (exit code 2 for bad input); add --debug for the traceback."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tensorfold {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(
        False, "--debug", envvar=DEBUG_ENV, help="Show the full traceback when a command fails."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Tensor decompositions and neural-network compression on PyTorch."""


def register_commands(target: typer.Typer, modules: tuple[str, ...] = COMMAND_MODULES) -> list[str]:
    """Call ``tensorfold.cli.<name>.register(target)`` for every module that exists; return their names."""
    registered = []
    for name in modules:
        module_name = f"tensorfold.cli.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(target)
        registered.append(name)
    return registered


register_commands(app)
