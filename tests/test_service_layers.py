"""The service's layers: the errors and the data plane know no web framework, the modules of
service/ (and of convert/, core/, models/) import each other without a cycle, and `bnfold
serve` resolves providers once."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from bnfold.cli import app as cli_app
from bnfold.service import serve_cli
from bnfold.service.providers import CPU
from bnfold.service.rest import app as rest_app

from service_packages import write_mlp

SERVICE = Path(serve_cli.__file__).resolve().parent
WEB_FRAMEWORKS = ("fastapi", "starlette", "uvicorn")


@pytest.mark.parametrize("module", ["bnfold.service.errors", "bnfold.service.dataplane"])
def test_the_domain_imports_no_web_framework(module: str) -> None:
    """A fresh interpreter: what the test process imported already would hide an import."""
    probe = (
        f"import sys, {module}; "
        f"print(sorted({{name.split('.')[0] for name in sys.modules}} & {set(WEB_FRAMEWORKS)!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def _module_name(path: Path, folder: Path, package: str) -> str:
    parts = [*package.split("."), *path.relative_to(folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith(
        "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The service modules `path` imports when it runs, a function-level import included
    (`if TYPE_CHECKING:` blocks never run)."""
    found = set()
    pending: list[ast.AST] = [ast.parse(path.read_text())]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        if _type_checking_only(node):
            pending.extend(node.orelse)  # type: ignore[attr-defined]
        else:
            pending.extend(ast.iter_child_nodes(node))
    return found & modules


def package_imports(folder: Path, package: str) -> dict[str, set[str]]:
    """Each module below `folder` (the package `package`) and the modules of it it imports."""
    paths = {_module_name(path, folder, package): path for path in folder.rglob("*.py")}
    return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


def service_imports() -> dict[str, set[str]]:
    return package_imports(SERVICE, "bnfold.service")


def first_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (module -> the modules it imports), as a path back to its start."""
    finished: set[str] = set()

    def visit(name: str, trail: list[str]) -> list[str] | None:
        if name in trail:
            return [*trail[trail.index(name) :], name]
        if name in finished:
            return None
        for imported in sorted(graph[name]):
            cycle = visit(imported, [*trail, name])
            if cycle:
                return cycle
        finished.add(name)
        return None

    return next((cycle for name in sorted(graph) if (cycle := visit(name, []))), None)


def test_the_cycle_finder_finds_cycles() -> None:
    assert first_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert first_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_service_modules_import_no_cycle() -> None:
    graph = service_imports()
    assert "bnfold.service.dataplane" in graph["bnfold.service.rest.routes"] | set().union(
        *(graph[name] for name in graph["bnfold.service.rest.routes"])
    )
    assert first_cycle(graph) is None


@pytest.mark.parametrize(
    ("folder", "package"),
    [("convert", "bnfold.convert"), ("core", "bnfold"), ("models", "bnfold.models")],
)
def test_the_other_packages_import_no_cycle(folder: str, package: str) -> None:
    graph = package_imports(SERVICE.parent / folder, package)
    assert len(graph) > 1
    assert first_cycle(graph) is None


def test_serve_resolves_the_providers_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`bnfold serve` resolves them before uvicorn starts; the app's lifespan takes them."""
    write_mlp(tmp_path, "mlp", 1, seed=1)
    resolved: list[Any] = []
    captured: dict[str, Any] = {}

    def resolve_once(device: Any) -> tuple[str, ...]:
        resolved.append(device)
        return (CPU,)

    def resolve_again(device: Any) -> tuple[str, ...]:
        raise AssertionError("the lifespan resolved the providers again")

    monkeypatch.setattr(serve_cli, "resolve_providers", resolve_once)
    monkeypatch.setattr(rest_app, "resolve_providers", resolve_again)
    monkeypatch.setattr(serve_cli.uvicorn, "run", lambda app, **_: captured.update(app=app))
    for name in [name for name in serve_cli.os.environ if name.startswith("BNFOLD_")]:
        monkeypatch.delenv(name)
    result = CliRunner().invoke(cli_app, ["serve", "-r", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(resolved) == 1
    assert asyncio.run(_started_metadata(captured["app"]))["execution_providers"] == [CPU]


async def _started_metadata(app: FastAPI) -> dict[str, Any]:
    """The model's metadata parameters from `app`, its lifespan run as uvicorn runs it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bnfold") as client:
            response = await client.get("/v2/models/mlp")
    return response.json()["parameters"]
