"""The `bnfold` command line: one Typer app, thin commands.

The console-script entry point, in the root package because it belongs to
neither half: it registers the converter's commands (`bnfold.convert.cli`,
which imports torch only inside the commands that need it) and the service's
(`bnfold.service.serve_cli`). It must import without torch: the base install
is the serving stack. `python -m bnfold` runs it too.
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
