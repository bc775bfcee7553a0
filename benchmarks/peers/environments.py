"""Each peer's virtualenv: outside the repository, pinned, installed once.

The peers are never in the project's extras: their dependency trees (MLServer's,
KServe's, PyTriton's bundled Triton) conflict with each other and with bnfold's, and a
user comparing would install each on its own. Each gets onnxruntime at bnfold's own
version, so the graph runs on the same runtime everywhere. A marker file in each
virtualenv holds the requirements it was installed with: the same requirements install
nothing again; changed pins reinstall into a fresh virtualenv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

#: Where the virtualenvs live unless --peers-dir or this variable says otherwise.
DIRECTORY_VARIABLE = "BNFOLD_PEERS_DIR"
DEFAULT_DIRECTORY = Path.home() / ".cache" / "bnfold" / "peers"
MARKER = ".bnfold-peer-requirements"


@dataclass(frozen=True)
class PeerEnvironment:
    """A peer's pins, and the fixes installing or running it needed (for the report)."""

    name: str
    requirements: tuple[str, ...]
    distributions: tuple[str, ...]  # whose installed versions the report names
    install_fixes: tuple[str, ...] = ()
    #: Sees bnfold's own virtualenv after its own packages (a .pth line): for servers that
    #: run bnfold's app itself, which must then be the project's, not a copy.
    on_bnfold: bool = False

    def all_requirements(self) -> list[str]:
        if self.on_bnfold:
            return list(self.requirements)
        return [*self.requirements, f"onnxruntime=={version('onnxruntime')}", "numpy"]


ENVIRONMENTS = {
    "mlserver": PeerEnvironment(
        "mlserver",
        ("mlserver==1.7.1", "uvloop<0.22"),
        ("mlserver", "uvicorn", "uvloop", "fastapi"),
        (
            "uvloop<0.22: with uvloop 0.22 or later MLServer 1.7.1's inference worker dies "
            "as it starts (`asyncio.get_event_loop()` raises in mlserver/parallel/worker.py) "
            "and is restarted without end",
        ),
    ),
    "kserve": PeerEnvironment(
        "kserve", ("kserve==0.21.0",), ("kserve", "uvicorn", "uvloop", "fastapi")
    ),
    "pytriton": PeerEnvironment(
        "pytriton", ("nvidia-pytriton==0.7.0",), ("nvidia-pytriton", "tritonclient")
    ),
    "asgi-servers": PeerEnvironment(
        "asgi-servers",
        ("granian==2.8.9", "hypercorn==0.18.0"),
        ("granian", "hypercorn", "uvicorn", "uvloop"),
        on_bnfold=True,
    ),
}


def peers_directory(option: Path | None = None) -> Path:
    if option is not None:
        return option
    return Path(os.environ.get(DIRECTORY_VARIABLE) or DEFAULT_DIRECTORY)


def interpreter(directory: Path, name: str) -> Path:
    return directory / name / "bin" / "python"


def ensure_environment(directory: Path, environment: PeerEnvironment) -> Path:
    """The peer's interpreter, its virtualenv (re)installed when missing or pinned otherwise."""
    venv = directory / environment.name
    wanted = "\n".join(environment.all_requirements())
    marker = venv / MARKER
    if marker.is_file() and marker.read_text() == wanted:
        return interpreter(directory, environment.name)
    shutil.rmtree(venv, ignore_errors=True)
    print(
        f"installing {environment.name} into {venv}: {', '.join(wanted.splitlines())}", flush=True
    )
    base = getattr(sys, "_base_executable", sys.executable)  # not bnfold's venv's site-packages
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    python = interpreter(directory, environment.name)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *wanted.splitlines()], check=True)
    if environment.on_bnfold:
        _see_bnfold(python)
    marker.write_text(wanted)
    return python


def _see_bnfold(python: Path) -> None:
    """A .pth in the virtualenv adding bnfold's site-packages as a site directory (its own
    .pth files, the editable install's among them, processed), after the venv's own."""
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    mine = sysconfig.get_path("purelib")
    line = f"import site; site.addsitedir({mine!r})\n"
    (Path(site_packages) / "bnfold-virtualenv.pth").write_text(line)


def installed_versions(python: Path, distributions: tuple[str, ...]) -> dict[str, str]:
    """Versions inside a peer's virtualenv (its interpreter asked, not this one)."""
    names = [*distributions, "onnxruntime", "numpy"]
    script = (
        "import json, sys\nfrom importlib.metadata import version\n"
        "print(json.dumps({name: version(name) for name in sys.argv[1:]}))"
    )
    output = subprocess.run(
        [str(python), "-c", script, *names], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output)
