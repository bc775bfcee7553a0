"""tritonclient.grpc.aio, unchanged, against the server: concurrent calls merged by the shared
batcher, compression, a client cancelling a queued call, a full queue, the message limit,
graceful shutdown draining a call in flight, and a gRPC port already taken.

Timing-dependent cases use the `slow` model (tests/reliability/packages.py): its run time
grows with the batch (about 0.3 ms a row on one core), so a big batch keeps the server's
one run busy while a test acts, and the test waits on the server's own metrics for the
state it needs instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service_packages import MLP_SEEDS, mlp_reference, mlp_weights
from service_server import RunningServer, grpc_settings, running_server

FLOAT32_EPS = float(np.finfo(np.float32).eps)
SLOW_ROWS = 3000  # about a second of the slow model on one thread
SLOW_WIDTH = 256


def metric(server: RunningServer, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def wait_for_metric(server: RunningServer, name: str, value: float, **labels: str) -> None:
    deadline = time.monotonic() + 30
    while await asyncio.to_thread(metric, server, name, **labels) < value:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
        await asyncio.sleep(0.01)


def slow_input(rows: int, seed: int = 0) -> tuple[np.ndarray, triton.InferInput]:
    batch = np.random.default_rng(seed).normal(size=(rows, SLOW_WIDTH)).astype(np.float32)
    tensor = triton_aio.InferInput("x", [rows, SLOW_WIDTH], "FP32")
    tensor.set_data_from_numpy(batch)
    return batch, tensor


def slow_reference(repository: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        str(repository / "slow" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(["y"], {"x": batch})[0]


def one_run_settings(repository: Path, **settings: object) -> dict[str, object]:
    """One session run at a time on one thread, no merging: a second call waits in the queue."""
    return grpc_settings(
        repository,
        concurrent_runs=1,
        intra_op_threads=1,
        max_batch_size=0,
        warmup=False,
        **settings,
    )


# ---------------------------------------------------------------- the shared server


def test_concurrent_calls_with_compression_are_each_answered_right(
    grpc_service: RunningServer,
) -> None:
    batches = [
        np.random.default_rng(seed).normal(size=(seed % 5 + 1, 8)).astype(np.float32)
        for seed in range(24)
    ]

    async def run() -> list[np.ndarray]:
        async with triton_aio.InferenceServerClient(grpc_service.grpc_address) as client:
            assert await client.is_server_live() and await client.is_server_ready()
            assert (await client.get_server_metadata()).name == "bnfold"
            assert await client.is_model_ready("mlp")

            async def infer(position: int, batch: np.ndarray) -> np.ndarray:
                tensor = triton_aio.InferInput("input", list(batch.shape), "FP32")
                tensor.set_data_from_numpy(batch)
                result = await client.infer(
                    "mlp",
                    [tensor],
                    model_version="1",
                    request_id=str(position),
                    compression_algorithm="gzip" if position % 2 else None,
                )
                assert result.get_response().id == str(position)
                return result.as_numpy("output")

            return await asyncio.gather(*(infer(i, batch) for i, batch in enumerate(batches)))

    outputs = asyncio.run(run())
    for batch, output in zip(batches, outputs, strict=True):
        expected = mlp_reference(mlp_weights(MLP_SEEDS[1]), batch)["eval"]
        tolerance = 32 * FLOAT32_EPS * float(np.abs(expected).max())
        np.testing.assert_allclose(output, expected, rtol=0, atol=tolerance)


# ---------------------------------------------------------------- one run at a time


@pytest.fixture(scope="module")
def one_run(grpc_repository: Path) -> Iterator[RunningServer]:
    with running_server(one_run_settings(grpc_repository, max_queue_size=1)) as server:
        yield server


def test_a_call_cancelled_while_queued_never_runs(
    one_run: RunningServer, grpc_repository: Path
) -> None:
    async def run() -> tuple[np.ndarray, np.ndarray]:
        async with triton_aio.InferenceServerClient(one_run.grpc_address) as client:
            runs_before = metric(one_run, "bnfold_run_requests_count", model="slow")
            in_flight = metric(one_run, "bnfold_requests_in_flight", endpoint="grpc_infer")
            # about two seconds of runs: the queued call surely waits, even on a busy machine
            batch, tensor = slow_input(4 * SLOW_ROWS)
            running = asyncio.create_task(client.infer("slow", [tensor]))
            await wait_for_metric(one_run, "bnfold_requests_in_flight", in_flight + 1)
            # in flight counts from the call's start; its 12 MB decode hops to a thread, and
            # the small call must come after it into the queue
            await asyncio.sleep(0.2)
            _, small = slow_input(1, seed=1)
            queued = asyncio.create_task(client.infer("slow", [small]))
            await wait_for_metric(one_run, "bnfold_requests_in_flight", in_flight + 2)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            await wait_for_metric(
                one_run, "bnfold_requests_cancelled_total", 1, model="slow", stage="queued"
            )
            served = (await running).as_numpy("y")
            # only the first call ran; the server goes on serving
            assert metric(one_run, "bnfold_run_requests_count", model="slow") == runs_before + 1
            after, tensor = slow_input(2, seed=2)
            return batch, served, after, (await client.infer("slow", [tensor])).as_numpy("y")

    batch, served, after, served_after = asyncio.run(run())
    np.testing.assert_allclose(served, slow_reference(grpc_repository, batch), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        served_after, slow_reference(grpc_repository, after), rtol=1e-5, atol=1e-6
    )


def test_a_full_queue_is_unavailable_with_retry_pushback(one_run: RunningServer) -> None:
    async def run() -> grpc.aio.AioRpcError:
        async with triton_aio.InferenceServerClient(one_run.grpc_address) as client:
            in_flight = metric(one_run, "bnfold_requests_in_flight", endpoint="grpc_infer")
            _, big = slow_input(SLOW_ROWS)
            running = asyncio.create_task(client.infer("slow", [big]))
            await wait_for_metric(one_run, "bnfold_requests_in_flight", in_flight + 1)
            _, small = slow_input(1)
            queued = asyncio.create_task(client.infer("slow", [small]))  # max_queue_size 1
            await wait_for_metric(one_run, "bnfold_requests_in_flight", in_flight + 2)
            with pytest.raises(InferenceServerException) as refused:
                await client.infer("slow", [small])
            assert refused.value.status() == "StatusCode.UNAVAILABLE"
            assert "max_queue_size" in refused.value.message()
            request = service_pb2.ModelInferRequest(model_name="slow")
            request.inputs.add(name="x", datatype="FP32", shape=[1, SLOW_WIDTH])
            request.raw_input_contents.append(np.zeros(SLOW_WIDTH, np.float32).tobytes())
            async with grpc.aio.insecure_channel(one_run.grpc_address) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                try:
                    await stub.ModelInfer(request)
                except grpc.aio.AioRpcError as error:
                    caught = error
                else:
                    pytest.fail("a call beyond max_queue_size was served")
            await asyncio.gather(running, queued)
            return caught

    error = asyncio.run(run())
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    trailing = dict(error.trailing_metadata())
    assert trailing.pop("x-request-id")  # the call's id survives the abort's own metadata
    assert trailing == {"grpc-retry-pushback-ms": "1000", "retry-after": "1"}


# ---------------------------------------------------------------- limits


def test_a_message_over_the_body_limit_is_resource_exhausted(grpc_repository: Path) -> None:
    settings = grpc_settings(grpc_repository, max_body_bytes=4096, max_decode_bytes=4096)
    with running_server(settings) as server:
        client = triton.InferenceServerClient(server.grpc_address)
        fits = np.zeros((100, 8), np.float32)  # 3200 bytes
        too_big = np.zeros((200, 8), np.float32)  # 6400 bytes
        for batch, ok in ((fits, True), (too_big, False)):
            tensor = triton.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            if ok:
                assert client.infer("mlp", [tensor]).as_numpy("output").shape == (100, 4)
                continue
            with pytest.raises(InferenceServerException) as caught:
                client.infer("mlp", [tensor])
            assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        # a small message whose typed values would decode beyond the decode budget
        request = service_pb2.ModelInferRequest(model_name="lookup")
        request.inputs.add(name="index", datatype="INT64", shape=[300])
        request.inputs[0].contents.int64_contents.extend([1] * 300)
        assert request.ByteSize() < 4096
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "decode budget" in refused.value.details()
        client.close()


# uvicorn ends its thread with SystemExit(3) when the lifespan fails: the point of this test
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_grpc_port_in_use_fails_the_start(
    grpc_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running_server(grpc_settings(grpc_repository, warmup=False)) as first:
        taken = first.app.state.grpc_port
        second = grpc_settings(grpc_repository, grpc_port=taken, warmup=False)
        with pytest.raises(RuntimeError, match="failed to start"), running_server(second):
            pytest.fail("a second server took the gRPC port")
        assert f"gRPC cannot listen on 127.0.0.1:{taken}" in caplog.text
        assert "--grpc-port" in caplog.text and "--no-grpc" in caplog.text
        assert triton.InferenceServerClient(first.grpc_address).is_server_ready()


# ---------------------------------------------------------------- shutdown


@contextlib.contextmanager
def stopping_in_background(stack: contextlib.ExitStack) -> Iterator[threading.Thread]:
    """Leave the server's context (uvicorn's graceful shutdown) in a thread, so the test can
    watch calls while the server drains."""
    closer = threading.Thread(target=stack.close, name="server-shutdown")
    closer.start()
    try:
        yield closer
    finally:
        closer.join(timeout=60)


def test_shutdown_drains_a_call_in_flight_and_refuses_new_ones(grpc_repository: Path) -> None:
    stack = contextlib.ExitStack()
    server = stack.enter_context(
        running_server(one_run_settings(grpc_repository, shutdown_grace_seconds=20))
    )
    # three times the usual rows: the call must outlast the start of the shutdown for a
    # new call to be refused meanwhile (at SLOW_ROWS it ended first about once in 20 runs)
    batch, tensor = slow_input(3 * SLOW_ROWS, seed=3)
    results: dict[str, object] = {}

    def call() -> None:
        client = triton.InferenceServerClient(server.grpc_address)
        try:
            results["answer"] = client.infer("slow", [tensor]).as_numpy("y")
        except InferenceServerException as error:
            results["answer"] = error
        client.close()

    caller = threading.Thread(target=call)
    caller.start()
    asyncio.run(wait_for_metric(server, "bnfold_requests_in_flight", 1, endpoint="grpc_infer"))
    address = server.grpc_address
    started = time.monotonic()
    with stopping_in_background(stack) as closer:
        refused = None
        late = triton.InferenceServerClient(address)
        while refused is None and caller.is_alive():
            try:
                late.is_server_live()
            except InferenceServerException as error:
                refused = error
            time.sleep(0.01)
        late.close()
        caller.join(timeout=60)
    assert not closer.is_alive()
    answer = results["answer"]
    assert isinstance(answer, np.ndarray), answer
    np.testing.assert_allclose(answer, slow_reference(grpc_repository, batch), rtol=1e-5, atol=1e-6)
    assert refused is not None, "a new call was still served while the server drained"
    # grpc's own answer: UNAVAILABLE once the server's GOAWAY reached the client, CANCELLED
    # for a call that reached the server in the moment its shutdown began
    assert refused.status() in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")
    assert time.monotonic() - started < 20  # done when the call was, not at the grace's end


def test_shutdown_cancels_what_the_grace_period_cannot_finish(grpc_repository: Path) -> None:
    other_threads = set(threading.enumerate())
    stack = contextlib.ExitStack()
    server = stack.enter_context(
        running_server(one_run_settings(grpc_repository, shutdown_grace_seconds=0.2))
    )
    _, tensor = slow_input(SLOW_ROWS * 3, seed=4)
    results: dict[str, object] = {}

    def call() -> None:
        client = triton.InferenceServerClient(server.grpc_address)
        try:
            results["answer"] = client.infer("slow", [tensor])
        except InferenceServerException as error:
            results["answer"] = error
        client.close()

    caller = threading.Thread(target=call)
    caller.start()
    asyncio.run(wait_for_metric(server, "bnfold_requests_in_flight", 1, endpoint="grpc_infer"))
    started = time.monotonic()
    with stopping_in_background(stack):
        caller.join(timeout=60)
    stopped_after = time.monotonic() - started
    answer = results["answer"]
    assert isinstance(answer, InferenceServerException), answer
    assert answer.status() in ("StatusCode.CANCELLED", "StatusCode.UNAVAILABLE")
    assert stopped_after < 0.2 + 2  # the grace period and the exit, not the 3 s run
    # the cut-off run still ends on its own thread: let it, before this process may exit
    # (onnxruntime aborts a process that exits during a run)
    for thread in set(threading.enumerate()) - other_threads:
        if thread.name.startswith("bnfold-run-slow-"):
            thread.join(timeout=30)
            assert not thread.is_alive()
