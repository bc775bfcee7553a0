"""Reading the Docker and Kubernetes files for the deploy tests: the Dockerfile's stages, .dockerignore.

No Docker engine runs on the test machines, so the tests read what the engine
would read. The Dockerfile reader handles what this Dockerfile uses: line
continuations, comments, parser directives, `FROM image AS name`, ENV in
key=value form and exec-form (JSON) commands.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RUNTIME_REQUIREMENTS_SCRIPT = ROOT / "deploy" / "runtime-requirements.py"
HEALTHCHECK_SCRIPT = ROOT / "deploy" / "healthcheck.py"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form CMD/ENTRYPOINT/RUN (after HEALTHCHECK's `CMD`)."""
        text = self.arguments
        if self.keyword == "HEALTHCHECK":
            text = text.split(" CMD ", 1)[1] if " CMD " in text else text.removeprefix("CMD ")
        command = json.loads(text)
        if not (isinstance(command, list) and all(isinstance(part, str) for part in command)):
            raise ValueError(f"line {self.line}: {self.keyword} is not in exec form")
        return command


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [instruction for instruction in self.instructions if instruction.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        if not found:
            raise LookupError(f"stage {self.name or self.base} has no {keyword}")
        return found[-1]

    def env(self) -> dict[str, str]:
        """Every ENV of this stage, key=value form, later values winning."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for pair in shlex.split(instruction.arguments):
                key, separator, value = pair.partition("=")
                if not separator:
                    raise ValueError(f"line {instruction.line}: use ENV key=value")
                values[key] = value
        return values

    def run_text(self) -> str:
        return "\n".join(instruction.arguments for instruction in self.all("RUN"))


@dataclass(frozen=True)
class Dockerfile:
    global_args: dict[str, str]
    stages: tuple[Stage, ...]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise LookupError(f"no stage named {name}")

    @property
    def final(self) -> Stage:
        """The stage `docker build` without --target produces."""
        return self.stages[-1]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) per instruction: continuations joined, comments dropped."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit inside a continued instruction too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        lines.append((start, " ".join(pending)))
        pending = []
    if pending:
        raise ValueError("the Dockerfile ends inside a continued line")
    return lines


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    base, name = "", None
    for number, line in _logical_lines(text):
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip(), number)
        if instruction.keyword == "FROM":
            if current is not None:
                stages.append(Stage(base, name, tuple(current)))
            found = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", arguments, re.I)
            if found is None:
                raise ValueError(f"line {number}: cannot read FROM {arguments}")
            base, name, current = found.group(1), found.group(2), []
        elif current is None:
            if instruction.keyword != "ARG":
                raise ValueError(f"line {number}: only ARG may come before the first FROM")
            key, _, default = instruction.arguments.partition("=")
            global_args[key] = default
        else:
            current.append(instruction)
    if current is not None:
        stages.append(Stage(base, name, tuple(current)))
    return Dockerfile(global_args, tuple(stages))


def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def _pattern_matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches a path or a directory above it; `*` stays within
    one path segment, `**` spans any number."""
    regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
    regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[: index + 1])) for index in range(len(parts)))


def in_build_context(path: str) -> bool:
    """Whether .dockerignore lets `path` (relative, /-separated) into the build context.

    The last matching pattern decides; `!pattern` lets a path back in.
    """
    included = True
    for pattern in dockerignore_patterns():
        negated = pattern.startswith("!")
        if _pattern_matches(pattern.removeprefix("!"), path):
            included = negated
    return included


def image_names() -> dict[str, str]:
    """The image tags README, compose and the manifests use, by DEVICE build-arg:
    bnfold's version, which a release changes in all of them."""
    tag = version("bnfold")
    return {"cpu": f"bnfold:{tag}", "cuda": f"bnfold:{tag}-cuda"}
