"""The HTTP ceiling: an empty FastAPI POST handler on the same route as bnfold's infer.

It reads the request body (a POST server has to receive it) and answers a
constant small JSON object: no parsing, no model. Whatever a real server does
on top of this costs throughput; this is the most uvicorn + FastAPI can answer
on the machine. Same uvicorn options as `bnfold serve` (uvloop, httptools, no
access log).

    python benchmarks/empty_server.py --port 8002 [--workers 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response

ANSWER = b'{"model_name":"empty","outputs":[]}'


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(b'{"ready":true}', media_type="application/json")

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request) -> Response:
        await request.body()
        return Response(ANSWER, media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=1)
    arguments = parser.parse_args()
    uvicorn.run(
        "empty_server:create_app" if arguments.workers > 1 else create_app(),
        factory=arguments.workers > 1,
        workers=arguments.workers if arguments.workers > 1 else None,
        app_dir=str(Path(__file__).parent),
        host="127.0.0.1",
        port=arguments.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
