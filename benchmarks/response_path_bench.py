"""What answering a small inference response costs the event loop: ASGI's two messages
(starlette's `Response.__call__`, uvicorn's `send`, `OneSendResponses`) against the one
call the lane makes through the server's `respond` extension (service/whole_response.py),
the extension's making per request included.

Both write the same bytes (tests/test_http_one_send.py checks it) through uvicorn's own
request-response cycle to a transport that records nothing; a fresh cycle per response,
as per request, its cost measured alone and subtracted. Rounds alternate the two ways;
the minimum of the rounds is the cost with the least noise from the machine.

    .venv/bin/python benchmarks/response_path_bench.py [--responses 20000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from collections.abc import Awaitable, Callable

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from bnfold.service.rest.responses import EncodedBodyResponse
from bnfold.service.whole_response import OneSendResponses, extension

# the digits MLP's answer to one image, as the codec encodes it
BODY = (
    b'{"model_name":"digits_mlp","model_version":"1","outputs":[{"name":"logits",'
    b'"datatype":"FP32","shape":[1,10],"data":[-3.1,0.2,7.4,-1.9,0.5,-2.2,1.1,-0.7,2.6,-4.0]}]}'
)
REQUEST_ID = (b"x-request-id", b"1b99e97863465c47")
SCOPE = {"type": "http", "method": "POST", "http_version": "1.1"}


class NullTransport:
    def write(self, data: bytes) -> None: ...

    def writelines(self, pieces: tuple[bytes, ...]) -> None: ...

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


TRANSPORT = NullTransport()
FLOW = FlowControl(TRANSPORT)  # type: ignore[arg-type]
LOGGER = logging.getLogger("response-path-bench")


def new_cycle() -> RequestResponseCycle:
    return RequestResponseCycle(
        scope=SCOPE,  # type: ignore[arg-type]
        transport=OneSendResponses(TRANSPORT),  # type: ignore[arg-type]
        flow=FLOW,
        logger=LOGGER,
        access_logger=LOGGER,
        access_log=False,
        default_headers=[(b"date", b"Thu, 03 Dec 2026 12:00:00 GMT")],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=True,
        on_response=lambda: None,
    )


async def cycles_only(count: int) -> None:
    for _ in range(count):
        new_cycle()


async def asgi_messages(count: int) -> None:
    for _ in range(count):
        cycle = new_cycle()
        response = EncodedBodyResponse(BODY, [(b"content-type", b"application/json")])
        response.raw_headers.append(REQUEST_ID)
        await response(SCOPE, None, cycle.send)  # type: ignore[arg-type]


async def one_call(count: int) -> None:
    for _ in range(count):
        cycle = new_cycle()
        offered = extension(cycle, TRANSPORT)  # type: ignore[arg-type]  # the protocol's part
        response = EncodedBodyResponse(BODY, [(b"content-type", b"application/json")])
        if not offered["respond"](200, [*response.fields, REQUEST_ID], response.body):
            raise RuntimeError("respond declined a plain 200")


async def measure(responses: int, rounds: int) -> dict[str, list[float]]:
    ways: dict[str, Callable[[int], Awaitable[None]]] = {
        "cycle alone": cycles_only,
        "ASGI messages": asgi_messages,
        "respond": one_call,
    }
    costs: dict[str, list[float]] = {name: [] for name in ways}
    for way in ways.values():
        await way(responses // 10)  # warm
    for round_index in range(rounds):
        order = list(ways.items())
        for name, way in order if round_index % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            await way(responses)
            costs[name].append((time.perf_counter() - started) / responses * 1e6)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=9)
    arguments = parser.parse_args()
    costs = asyncio.run(measure(arguments.responses, arguments.rounds))
    base = min(costs["cycle alone"])
    for name in ("ASGI messages", "respond"):
        best, median = min(costs[name]) - base, statistics.median(costs[name]) - base
        print(f"{name:14s} {best:5.2f} µs a response (median of rounds {median:5.2f})")


if __name__ == "__main__":
    main()
