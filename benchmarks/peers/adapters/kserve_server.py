"""KServe's ModelServer serving the repository's model.onnx files over V2 REST, written from
KServe's documented custom-model API: a `kserve.Model` whose `load` opens the session and
whose `predict` takes an `InferRequest` and returns an `InferResponse`, started with
`ModelServer().start(models)`.

Three departures from a plain `ModelServer().start`, each for the benchmark's sake:
* KServe 0.21 binds its REST server to 0.0.0.0 and its gRPC server to [::] in code; the
  REST server's host is set to 127.0.0.1 before it starts, and gRPC is off (not measured).
* KServe 0.21 answers 500 to a V2 request without an `id` unless the model sets one: the
  response gets a fresh id when the request has none.
* Per-request latency logging is off and logs are at WARNING, as `bnfold serve` runs
  in the benchmark (`--log-level warning`, no access log).
`predict` is a plain `def`, as in KServe's examples: KServe calls it on its event loop.

    python kserve_server.py --repository REPO --threads 2 --http-port 8080
"""

from __future__ import annotations

import logging
from pathlib import Path

import kserve
import kserve.model_server
from kserve import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer
from kserve.utils.utils import generate_uuid
from ort_models import arguments, model_paths, open_session

DATATYPES = {"tensor(float)": "FP32"}


class OnnxRuntimeModel(kserve.Model):
    def __init__(self, name: str, path: Path, threads: int) -> None:
        super().__init__(name)
        self.path, self.threads = path, threads
        self.load()

    def load(self) -> bool:
        self.session = open_session(self.path, self.threads)
        self.output_types = {meta.name: meta.type for meta in self.session.get_outputs()}
        self.ready = True
        return self.ready

    def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None
    ) -> InferResponse:
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        values = self.session.run(None, feeds)
        outputs = [
            InferOutput(name, list(value.shape), DATATYPES[self.output_types[name]], data=value)
            for name, value in zip(self.output_types, values, strict=True)
        ]
        return InferResponse(
            response_id=payload.id or generate_uuid(),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )


class LoopbackRESTServer(RESTServer):
    """KServe's REST server, listening on 127.0.0.1 instead of its hard-coded 0.0.0.0."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = "127.0.0.1"


def main() -> None:
    options = arguments(__doc__.splitlines()[0], "http-port")
    kserve.model_server.RESTServer = LoopbackRESTServer
    models = [
        OnnxRuntimeModel(name, path, options.threads)
        for name, path in model_paths(options.repository).items()
    ]
    server = kserve.ModelServer(
        http_port=options.http_port, enable_grpc=False, enable_latency_logging=False
    )
    for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start(models)


if __name__ == "__main__":
    main()
