"""Where a bnfold process spends its time under load: py-spy samples, by part.

A sample on a run thread (the batcher's, or the executor's for compare) counts as such;
any other goes to the innermost frame a specific part names (bnfold's own code sits
inside the framework's frames), else to the innermost frame a generic part names.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

from .harness import PYTHON, WORK, bnfold_command, free_port, serve
from .load import load, write_bodies
from .results import MODELS

RUN_THREAD_PART = "run threads: onnxruntime runs, batch assembly"
RUN_THREADS = ("_serve (service/batching.py", "_worker (concurrent/futures/thread.py")
SPECIFIC_PARTS = (
    (
        "hand-off between threads (wake-ups, futures)",
        ("(concurrent/futures/", "(asyncio/futures.py", "(threading.py"),
    ),
    ("bnfold: batcher (queue, dispatch, completion)", ("(service/batching.py",)),
    ("bnfold: decode (body, JSON or binary to numpy)", ("decode_request (", "read_body (")),
    ("bnfold: encode (numpy to JSON or binary)", ("encode_response (", "inference_response (")),
    ("bnfold: validation, model lookup", ("(service/dataplane.py", "(service/registry.py")),
    ("bnfold: metrics", ("(service/metrics.py",)),
)
GENERIC_PARTS = (
    (
        "bnfold: other request code",
        ("(service/rest/", "(service/codec.py", "(service/errors.py"),
    ),
    ("Starlette/FastAPI: middleware, routing, responses", ("(starlette/", "(fastapi/")),
    ("uvicorn: HTTP protocol", ("(uvicorn/protocols/", "(uvicorn/middleware/")),
)
PROFILED = (("digits_mlp", "json"), ("resnet18", "json"), ("resnet18", "binary"))


def _classify(stack: str) -> str:
    frames = stack.split(";")
    if any(marker in frame for frame in frames for marker in RUN_THREADS):
        return RUN_THREAD_PART
    for parts in (SPECIFIC_PARTS, GENERIC_PARTS):
        for frame in reversed(frames):
            for part, markers in parts:
                if any(marker in frame for marker in markers):
                    return part
    return "event loop (uvloop: sockets, timers, callbacks)"


def bench_profile(repository: Path, seconds: float) -> dict[str, dict[str, float]]:
    """py-spy samples of bnfold under load at 8 clients, by part; {} without py-spy."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(PYTHON).parent))
    if spy is None:
        return {}
    shares: dict[str, dict[str, float]] = {}
    bodies = {model: write_bodies(repository, model) for model in MODELS}
    port = free_port()
    with serve("bnfold profiled", bnfold_command(repository, port), port) as server:
        for model, encoding in PROFILED:
            url = f"{server.url}/v2/models/{model}/infer"
            raw = WORK / f"profile.{model}.{encoding}.txt"
            loader = threading.Thread(
                target=load, args=(url, bodies[model][encoding], 8, seconds + 2)
            )
            loader.start()
            time.sleep(2.0)  # the one-second warm-up, then load
            subprocess.run(
                [
                    spy,
                    "record",
                    "--pid",
                    str(server.process.pid),
                    "--duration",
                    f"{seconds:g}",
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                ],
                check=True,
                capture_output=True,
            )
            loader.join()
            counts: dict[str, int] = {}
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                part = _classify(stack)
                counts[part] = counts.get(part, 0) + int(count)
            total = sum(counts.values()) or 1
            shares[f"{model} {encoding}"] = {
                part: 100 * count / total
                for part, count in sorted(counts.items(), key=lambda item: -item[1])
            }
            print(f"profile {model} {encoding}: {shares[f'{model} {encoding}']}", flush=True)
    return shares
