"""`bnfold serve`: placeholder until the service lands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def serve() -> None:
        """Serve a model repository over the KServe V2 protocol."""
        typer.echo("bnfold serve is not implemented yet", err=True)
        raise typer.Exit(2)
