"""The `bnfold` command line: one Typer app, thin commands.

This module is the console-script entry point and lives in the serving package
because the base install is the serving stack: it must import without torch.
Converter commands are registered from `bnfold.convert.cli`, which imports
torch only inside the commands that need it.
"""

from __future__ import annotations

from importlib.metadata import version as package_version

import typer

from bnfold.convert.cli import register as register_convert_commands
from bnfold.service.serve_cli import register as register_serve_command

app = typer.Typer(
    name="bnfold",
    help="Fold BatchNorm exactly into neighbouring layers, export ONNX, and serve it (KServe V2).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"bnfold {package_version('bnfold')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """bnfold: convert BatchNorm networks to folded ONNX packages and serve them."""


register_convert_commands(app)
register_serve_command(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
