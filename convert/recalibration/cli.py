"""`bnfold recalibrate`: parse, call `recalibrate`, print; errors become one line and an exit code.

Torch-free, and light to import: the library (onnx, onnxruntime) is imported
inside the command, so `bnfold --help` does not pay for it. Exit codes are the
converter's (`bnfold.convert.cli`): 2 for bad input (data, options, unknown or
unrecalibratable package), 1 when the re-folded model fails verification;
nothing is written in either case.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bnfold.convert.errors import ConvertError
from bnfold.convert.progress import step_progress

if TYPE_CHECKING:
    from bnfold.convert.recalibration.pipeline import RecalibrationResult
    from bnfold.convert.recalibration.statistics import RunProgress

stdout = Console()
stderr = Console(stderr=True)

RECALIBRATE_EPILOG = """
Methods:

  sequential (default): each BatchNorm gets the exact mean and unbiased
  variance of its input over the data in eval mode, every earlier BatchNorm
  already using its new statistics: what the served model will see.
  --batch-size only sets how many samples run at once.

  batch: the classic precise-BN estimate. BatchNorms normalise each chunk of
  --batch-size samples with the chunk's own statistics (train mode, Dropout
  off); the chunks' statistics are pooled exactly. Later layers see
  train-mode activations, so the result depends on --batch-size; with one
  chunk of all the data the methods differ only by the biased/unbiased
  variance used upstream.

Examples:

  bnfold recalibrate ./repo/digits_resnet --data shifted.npy

  bnfold recalibrate ./repo/digits_resnet --version 1 --data images/ --max-samples 512

  bnfold recalibrate ./repo/my_net --data inputs.npz --method batch --batch-size 128 --json
"""


def recalibrate(
    model: Path = typer.Argument(
        ...,
        metavar="REPO/NAME",
        help="The model's directory in a model repository (REPO/NAME/VERSION also works).",
        show_default=False,
    ),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Unlabeled inputs: X.npy (one-input models), X.npz (one array per input name) "
        "or a directory of them (sorted by name, concatenated along the batch axis). "
        "The datatype and shape must be exactly the model's.",
    ),
    version: int | None = typer.Option(
        None, "--version", help="The version to recalibrate (default: the newest)."
    ),
    max_samples: int | None = typer.Option(
        None, "--max-samples", help="Use the first N samples only."
    ),
    method: str = typer.Option(
        "sequential", "--method", help="sequential (exact eval-mode statistics) or batch."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Samples per chunk (default 64; see the methods below)."
    ),
    new_version: int | None = typer.Option(
        None, "--new-version", help="The version to write (default: the next integer)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Re-estimate the BatchNorm statistics from data, re-fold, verify, write a new version."""
    with _exit_on_error():
        from bnfold.convert.recalibration.pipeline import RecalibrationRequest
        from bnfold.convert.recalibration.pipeline import recalibrate as run_recalibration

        repository, name, path_version = _model_path(model, version)
        request = RecalibrationRequest(
            repository=repository,
            name=name,
            data=data,
            version=path_version,
            method=method,  # type: ignore[arg-type]  # checked by the library
            max_samples=max_samples,
            batch_size=batch_size,
            new_version=new_version,
        )
        with recalibration_progress(not (as_json or no_progress)) as step:
            result = run_recalibration(request, step)
        if as_json:
            stdout.print_json(json.dumps(result.as_dict()))
        else:
            print_recalibration(result)


def _model_path(model: Path, version: int | None) -> tuple[Path, str, int | None]:
    """(REPO, NAME, version) from REPO/NAME, or from REPO/NAME/VERSION (a package directory)."""
    from bnfold.convert.errors import CalibrationDataError
    from bnfold.package_format import MANIFEST, is_version_name

    if is_version_name(model.name) and (model / MANIFEST).is_file():
        if version is not None and version != int(model.name):
            raise CalibrationDataError(
                f"{model} is version {model.name} but --version says {version}"
            )
        return model.parent.parent, model.parent.name, int(model.name)
    return model.parent, model.name, version


@contextmanager
def recalibration_progress(enabled: bool) -> Iterator[RunProgress]:
    """A progress bar on stderr over the steps, filled within a step by its chunk runs."""
    from bnfold.convert.recalibration.pipeline import STEPS
    from bnfold.convert.recalibration.statistics import no_run_progress

    if not enabled:
        yield no_run_progress
        return

    with step_progress(stderr) as progress:
        task = progress.add_task("recalibrating", total=len(STEPS))

        def advance(label: str, completed: int | None = None, total: int | None = None) -> None:
            position = STEPS.index(label) if label in STEPS else 0
            fraction = completed / total if completed is not None and total else 0.0
            counts = f" {completed}/{total}" if completed is not None and total else ""
            progress.update(
                task,
                completed=position + fraction,
                description=f"recalibrating: {label}{counts}",
            )

        yield advance
        progress.update(task, completed=len(STEPS))


def print_recalibration(result: RecalibrationResult) -> None:
    """The per-layer drift table (worst first), the verification, the new package."""
    table = Table(
        title=f"{result.name} v{result.from_version} → v{result.version}: {result.method} "
        f"on {result.samples} samples, {result.passes} passes, {result.seconds:.2f} s",
        title_justify="left",
    )
    table.add_column("BatchNorm", overflow="fold")
    table.add_column("depth", justify="right")
    table.add_column("KL before", justify="right")
    table.add_column("KL after", justify="right")
    table.add_column("mean shift before", justify="right")
    table.add_column("mean shift after", justify="right")
    for layer in result.layers:
        table.add_row(
            escape(layer.name),
            str(layer.depth),
            _mean_of(layer.before, "kl_divergence"),
            _mean_of(layer.after, "kl_divergence"),
            _mean_of(layer.before, "mean_shift"),
            _mean_of(layer.after, "mean_shift"),
        )
    table.caption = "channel means; mean shift in running standard deviations"
    table.caption_justify = "left"
    stdout.print(table)
    eval_block: dict[str, Any] = result.verification.get("eval", {})  # type: ignore[assignment]
    stdout.print(
        f"verified: eval max |Δ| {eval_block.get('max_abs_err', float('nan')):.2e} on "
        f"{result.verification.get('samples')} samples; data sha256 {result.data_sha256[:12]}…"
    )
    stdout.print(f"[green]wrote[/green] {escape(result.package_path)}")


@contextmanager
def _exit_on_error() -> Iterator[None]:
    """Errors of the recalibration as one line on stderr and their exit code (2 or 1)."""
    try:
        yield
    except KeyboardInterrupt:
        stderr.print("[red]interrupted:[/red] nothing was written")
        raise typer.Exit(130) from None
    except ConvertError as error:
        stderr.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None


def register(app: typer.Typer) -> None:
    app.command(epilog=RECALIBRATE_EPILOG)(recalibrate)


def _mean_of(block: dict[str, Any], measure: str) -> str:
    return f"{block[measure]['mean']:.3g}"
