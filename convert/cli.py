"""Converter commands: `bnfold convert`, `bnfold models list|build`.

Thin by design: parse, call the library, print, and turn a `ConvertError`
into its one-line message and exit code (2 bad input, 1 verification failed).
Importing this module must not import torch: the serving install has none,
and `bnfold serve --help` must still work there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    import numpy as np

    from bnfold.convert.conversion import ConversionAdapter
    from bnfold.convert.onnx.inspect import InspectReport
    from bnfold.convert.report import BatchNormReport, ConversionResult

stdout = Console()
stderr = Console(stderr=True)

#: What the missing-extra message tells a user to run (rich would eat `[convert]` as markup).
CONVERTER_INSTALL = "pip install 'bnfold[convert]'"


CONVERT_EPILOG = """
Examples:

  bnfold convert digits_resnet --repository ./repo

  bnfold convert my_net.py:build --weights net.pt --input-shape 1,3,32,32 --repository ./repo

  bnfold convert mypkg.nets:resnet --input-shape 1,3,224,224 --repository ./repo --json

  bnfold convert whole_model.pt --trust-pickle --input-shape 1,64 --repository ./repo

  bnfold convert exported.onnx --repository ./repo --sample batch.npy
"""


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'1,3,32,32' → (1, 3, 32, 32); every dimension a positive integer."""
    from bnfold.convert.errors import InputShapeError

    parts = [part.strip() for part in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(part) for part in parts)
    except ValueError:
        raise InputShapeError(
            f"invalid --input-shape {text!r}: expected comma-separated positive integers, "
            "e.g. 1,3,32,32"
        ) from None
    if not dims or any(dim <= 0 for dim in dims):
        raise InputShapeError(f"invalid --input-shape {text!r}: every dimension must be positive")
    if len(dims) < 2:
        raise InputShapeError(
            f"invalid --input-shape {text!r}: give the batch axis and at least one more, e.g. 1,64"
        )
    return dims


def is_onnx_source(source: str) -> bool:
    """An ONNX file goes down the torch-free path; everything else needs torch."""
    return source.lower().endswith(".onnx")


def register(app: typer.Typer) -> None:
    app.command(epilog=CONVERT_EPILOG)(convert)
    app.command(epilog=INSPECT_EPILOG)(inspect)
    from bnfold.convert.recalibration.cli import register as register_recalibrate

    register_recalibrate(app)
    models_app = typer.Typer(
        help="The built-in reference models and the embedded default repository.",
        no_args_is_help=True,
    )
    models_app.command("list")(models_list)
    models_app.command("build", epilog="Example:\n\n  bnfold models build --repository ./repo")(
        models_build
    )
    app.add_typer(models_app, name="models")


def convert(
    source: str = typer.Argument(
        ...,
        help="A built-in name, path/to/file.py:factory, package.module:factory, "
        "a pickled model (.pt, needs --trust-pickle) or a .onnx file.",
    ),
    repository: Path = typer.Option(
        ..., "--repository", "-r", help="Model repository to write REPO/NAME/VERSION/ into."
    ),
    name: str | None = typer.Option(
        None, help="Package name (default: built-in name, factory name or file stem)."
    ),
    version: int | None = typer.Option(
        None, help="Package version, 1 to 2**63-1 (default: the next integer)."
    ),
    input_shape: str | None = typer.Option(
        None,
        "--input-shape",
        help="Input shape with the batch axis first, e.g. 1,3,32,32 (the batch axis is exported "
        "dynamic). For an .onnx source: the sizes its symbolic axes take during verification.",
    ),
    weights: Path | None = typer.Option(
        None, help="A state_dict for a factory source, loaded with weights_only=True."
    ),
    sample: Path | None = typer.Option(
        None, help="A .npy batch to verify on, in addition to seeded random inputs."
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Allow unpickling a whole model (pickles run code)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Fold every exactly-foldable BatchNorm, verify, and write an ONNX model package."""
    with _exit_on_convert_error():
        from bnfold.convert.package import check_repository, check_version

        if version is not None:
            check_version(version)
        check_repository(repository)
        sample_array = _load_sample(sample) if sample is not None else None
        shape = parse_input_shape(input_shape) if input_shape else None
        from bnfold.convert.conversion import convert as run_conversion

        with conversion_progress(not as_json) as step:
            step("load")
            if is_onnx_source(source):
                adapter = _onnx_adapter(source, shape, sample_array)
            else:
                adapter = _torch_adapter(source, shape, sample_array, weights, trust_pickle)
            result = run_conversion(adapter, repository, name=name, version=version, step=step)
        if as_json:
            stdout.print_json(json.dumps(result.as_dict()))
        else:
            print_conversion(result)


def _torch_adapter(
    source: str,
    input_shape: tuple[int, ...] | None,
    sample: np.ndarray | None,
    weights: Path | None,
    trust_pickle: bool,
) -> ConversionAdapter:
    from bnfold.convert.torch.pipeline import TorchAdapter
    from bnfold.convert.torch.sources import load_source

    loaded = load_source(source, weights=weights, trust_pickle=trust_pickle)
    return TorchAdapter(loaded, input_shape, sample)


def _onnx_adapter(
    source: str, input_shape: tuple[int, ...] | None, sample: np.ndarray | None
) -> ConversionAdapter:
    from bnfold.convert.errors import SourceError
    from bnfold.convert.onnx.io import load_onnx_source
    from bnfold.convert.onnx.pipeline import OnnxAdapter

    path = Path(source)
    if not path.is_file():
        raise SourceError(f"cannot read {source}: no such file")
    return OnnxAdapter(load_onnx_source(path), sample, input_shape)


INSPECT_EPILOG = """
Examples:

  bnfold inspect exported.onnx

  bnfold inspect ./repo/digits_mlp/1 --json
"""


def inspect(
    path: Path = typer.Argument(
        ..., help="An .onnx file or a package directory REPO/NAME/VERSION."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Show the BatchNorm report (what folds, why the rest is kept) without writing anything."""
    with _exit_on_convert_error():
        from bnfold.convert.onnx.inspect import inspect_path

        report = inspect_path(path)
        if as_json:
            stdout.print_json(json.dumps(report.as_dict()))
        else:
            print_inspection(report)


def batchnorm_table(subject: str, report: BatchNormReport, verb: str) -> Table:
    """Every BN of a report: folded into which layer and how, or kept and why."""
    table = Table(
        title=f"{subject}: {len(report.folded)} of {report.total} BatchNorms {verb}",
        title_justify="left",
    )
    table.add_column("BatchNorm", overflow="fold")
    table.add_column("result")
    table.add_column("into / why kept", overflow="fold")
    for folded in report.folded:
        table.add_row(escape(folded.name), f"{verb} {folded.direction}", escape(folded.into))
    for kept in report.kept:
        table.add_row(escape(kept.name), "[yellow]kept[/yellow]", escape(kept.reason))
    if report.by_pattern:
        table.caption = "by pattern: " + ", ".join(
            f"{family} {count}" for family, count in report.by_pattern.items()
        )
        table.caption_justify = "left"
    return table


def print_inspection(report: InspectReport) -> None:
    """The BN table, then node counts per op type before and after folding."""
    verb = "folds" if report.kind == "onnx" else "folded"
    stdout.print(batchnorm_table(f"{report.path} ({report.kind})", report.batchnorm, verb))
    counts = Table(title="nodes per op type", title_justify="left")
    counts.add_column("op type")
    counts.add_column("before", justify="right")
    counts.add_column("after", justify="right")
    before = report.node_counts_before
    after = report.node_counts_after
    for op_type in dict.fromkeys([*(before or {}), *after]):
        counts.add_row(
            op_type,
            "?" if before is None else str(before.get(op_type, 0)),
            str(after.get(op_type, 0)),
        )
    counts.add_row(
        "[bold]total[/bold]",
        "?" if before is None else str(sum(before.values())),
        str(sum(after.values())),
    )
    stdout.print(counts)


def models_list() -> None:
    """List the built-in models and their input shapes."""
    from bnfold.models.registry import BUILTIN_MODELS

    table = Table(title="Built-in models")
    table.add_column("name")
    table.add_column("input shape")
    table.add_column("default repository")
    table.add_column("description")
    for spec in BUILTIN_MODELS.values():
        table.add_row(
            spec.name,
            ",".join(map(str, spec.input_shape)),
            "yes" if spec.in_default_repository else "no",
            spec.description,
        )
    stdout.print(table)


def models_build(
    repository: Path | None = typer.Option(
        None, "--repository", "-r", help="Where to build (default: the embedded repository)."
    ),
    force: bool = typer.Option(False, help="Convert again even when a package exists."),
) -> None:
    """Train (cached) and convert the built-in digits models into a repository."""
    with _exit_on_convert_error():
        from bnfold.convert.repository_build import build_default_repository
        from bnfold.models import DEFAULT_REPOSITORY

        target = repository or DEFAULT_REPOSITORY
        results = build_default_repository(target, progress=True, force=force)
        for result in results:
            print_conversion(result)
        stdout.print(f"[bold]repository ready:[/bold] {target}")


def print_conversion(result: ConversionResult) -> None:
    """The BN table and the measured errors."""
    stdout.print(batchnorm_table(f"{result.name} v{result.version}", result.batchnorm, "folded"))
    verification = result.verification
    eval_block = verification.get("eval", {})
    train_block = verification.get("train", {})
    calibration_block = verification.get("calibration", {})
    stdout.print(
        f"verified on {verification.get('samples')} samples: "
        f"eval max |Δ| {_number(eval_block, 'max_abs_err')} (rel {_number(eval_block, 'max_rel_err')}), "
        f"train max |Δ| {_number(train_block, 'max_abs_err')} (rel {_number(train_block, 'max_rel_err')}), "
        f"calibration max |Δ| {_number(calibration_block, 'max_abs_err')} "
        f"(rel {_number(calibration_block, 'max_rel_err')})"
    )
    stdout.print(f"[green]wrote[/green] {result.package_path}")


def _number(block: dict[str, Any], key: str) -> str:
    value = block.get(key)
    return f"{value:.2e}" if isinstance(value, (int, float)) else "n/a"


def _load_sample(path: Path) -> np.ndarray:
    import numpy as np

    from bnfold.convert.errors import SourceError

    if not path.is_file():
        raise SourceError(f"cannot read sample {path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as error:
        raise SourceError(f"cannot read sample {path} as a .npy array: {error}") from error


@contextmanager
def conversion_progress(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A progress bar over the conversion steps, on stderr."""
    if not enabled:
        yield lambda _label: None
        return
    from bnfold.convert.conversion import STEPS
    from bnfold.convert.progress import step_progress

    with step_progress(stderr) as progress:
        task = progress.add_task("converting", total=len(STEPS))
        seen: list[str] = []

        def advance(label: str) -> None:
            if seen:
                progress.advance(task)
            seen.append(label)
            progress.update(task, description=f"converting: {label}")

        yield advance
        progress.update(task, completed=len(STEPS))


@contextmanager
def _exit_on_convert_error() -> Iterator[None]:
    """The one place converter errors become exit codes."""
    try:
        yield
    except ModuleNotFoundError as error:
        if error.name in ("torch", "sklearn"):
            stderr.print(
                f"[red]error:[/red] {error.name} is not installed: "
                f"install the converter with {escape(CONVERTER_INSTALL)}",
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        raise
    except KeyboardInterrupt:
        stderr.print("[red]interrupted:[/red] nothing was written")
        raise typer.Exit(130) from None
    except Exception as error:
        from bnfold.convert.errors import ConvertError

        if not isinstance(error, ConvertError):
            raise
        stderr.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
