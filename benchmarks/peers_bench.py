"""Peer serving benchmark: bnfold against MLServer, KServe's ModelServer and PyTriton,
serving the same model.onnx files under the same load, interleaved, in one run.

Each peer is installed once into a virtualenv of its own outside the repository
(~/.cache/bnfold/peers/NAME, or --peers-dir, or $BNFOLD_PEERS_DIR; pinned versions with
bnfold's onnxruntime: peers/environments.py), and serves the serving benchmark's
repository (the digits MLP and ResNet-18) through a small adapter written from its
documented API (peers/adapters/), with bnfold's session options, threads and batching
defaults, on 127.0.0.1 only. Every server must answer one request per model and
encoding like in-process onnxruntime before it gets any load; a wrong answer or an error
is reported with its reason instead. Then, for each point (MLP JSON at 1 and 8 clients,
ResNet-18 JSON at 8, binary at 1 and 8, gRPC for bnfold and PyTriton), each server in
turn, in rounds whose order reverses; the empty FastAPI handler on the MLP JSON points
for reference. Also start-to-ready and the memory of each server's process tree after
the load.

Downloads the peers on the first run (about 1.4 GB of virtualenvs); never part of CI
or of `make bench`. Saves benchmarks/out/peers/results.json and writes its section of
BENCHMARKS.md (tables, versions and fixes; what they mean is written by hand below it)
and benchmarks/peers_bench.png.

    python benchmarks/peers_bench.py [--duration 8] [--rounds 2] [--servers bnfold KServe]
    python benchmarks/peers_bench.py --report-only   # re-render the last run
"""

from __future__ import annotations

from peers.command import main
from peers.report import PEERS
from peers.runs import POINTS
from peers.servers import WORK, kinds

RESULTS = WORK / "results.json"
PACKAGES = ("onnxruntime", "fastapi", "uvicorn", "uvloop", "httptools", "numpy", "grpcio")


if __name__ == "__main__":
    main(__doc__.splitlines()[0], kinds, POINTS, RESULTS, PEERS, PACKAGES)
