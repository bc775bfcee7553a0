"""Tiny models run on the event loop, everything else on run threads, with the same answers.

The batcher runs a request inline when its version's measured run time is below
what handing the run to a run thread costs (service/batching.py). Which path a
run took shows in `bnfold_inline_runs_total`; every run, either way, in
`bnfold_run_batch_size` and the statistics. Packages: the service test MLP
twice, `mlp` (server defaults: no gathering delay, so it may run inline) and
`gathered`, the same files with a 1 µs gathering delay in its config.json (every
run on a run thread); the reliability suite's `slow` (about 0.3 ms a row: never
inline); `lookup`, whose out-of-range index fails inside onnxruntime. Answers are
checked against onnxruntime run by the test itself, and inline against run-thread
answers bit for bit. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from reliability.harness import ServerProcess, server_process
from reliability.packages import SLOW_WIDTH, write_slow
from test_service_batching import metric, v2_body, v2_outputs

from bnfold.service.batching import RunEstimate, RunMean, RunSlots
from bnfold.service.rest.lane import inference_target
from bnfold.service.runs import RUN_ERRORS
from bnfold.service.sessions import session_runner
from bnfold.service.statistics import Execution

from service_packages import MLP_IN, lookup_table, write_lookup, write_mlp

REQUESTS = 30
MAX_REQUESTS = 1000  # single rows after the first REQUESTS, until one ran inline


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inline") / "repository"
    write_mlp(root, "mlp", 1, seed=3)
    shutil.copytree(root / "mlp", root / "gathered")
    manifest_path = root / "gathered" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["name"] = "gathered"
    manifest_path.write_text(json.dumps(manifest))
    (root / "gathered" / "config.json").write_text(
        json.dumps({"batching": {"max_queue_delay_us": 1}})
    )
    write_slow(root)
    write_lookup(root)
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerProcess]:
    """`bnfold serve` in a process of its own: the run-time estimate is the server's, not
    that of a test process holding hundreds of thousands of objects and earlier sessions
    (runs there measured 3-5x the CPU and never went inline)."""
    with server_process(repository) as running:
        yield running


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def infer(client: httpx.Client, model: str, inputs: dict[str, np.ndarray]) -> httpx.Response:
    body, headers = v2_body(inputs, None, binary=True)
    # binary outputs too: the bytes onnxruntime wrote, no JSON float round trip
    header_length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:header_length])
    header["parameters"] = {"binary_data_output": True}
    new_header = json.dumps(header).encode()
    headers["Inference-Header-Content-Length"] = str(len(new_header))
    return client.post(
        f"/v2/models/{model}/infer", content=new_header + body[header_length:], headers=headers
    )


def test_the_mlp_runs_inline_and_counts_as_every_run_does(
    server: ServerProcess, client: httpx.Client, repository: Path
) -> None:
    reference = ort.InferenceSession(
        str(repository / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(1)
    rows = sent = 0
    # the first run has no estimate yet and goes to a run thread; the rest may run inline
    # once the estimate (the runs' CPU) is under the hand-off's cost. On a loaded CI
    # machine the first runs measured more, so single rows go on until one ran inline.
    while sent < REQUESTS or (
        sent < MAX_REQUESTS and metric(server.url, "bnfold_inline_runs_total", model="mlp") < 1
    ):
        size = int(rng.integers(1, 4)) if sent < REQUESTS else 1
        batch = rng.normal(size=(size, MLP_IN)).astype(np.float32)
        rows += len(batch)
        sent += 1
        outputs = v2_outputs(infer(client, "mlp", {"input": batch}))
        [want] = reference.run(None, {"input": batch})
        np.testing.assert_allclose(outputs["output"], want, rtol=0, atol=1e-5)

    assert metric(server.url, "bnfold_inline_runs_total", model="mlp") >= 1
    assert metric(server.url, "bnfold_run_batch_size_count", model="mlp") == sent
    assert metric(server.url, "bnfold_run_batch_size_sum", model="mlp") == rows
    assert metric(server.url, "bnfold_queue_duration_seconds_count", model="mlp") == sent
    [stats] = client.get("/v2/models/mlp/stats").json()["model_stats"]
    assert stats["execution_count"] == sent
    assert stats["inference_count"] == rows
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == inference["queue"]["count"] == sent
    assert inference["compute_infer"]["count"] == sent
    assert inference["compute_infer"]["ns"] > 0
    assert (
        sum(batch["batch_size"] * batch["compute_infer"]["count"] for batch in stats["batch_stats"])
        == rows
    )


def test_a_slow_model_and_a_gathering_model_stay_on_run_threads(
    server: ServerProcess, client: httpx.Client
) -> None:
    rng = np.random.default_rng(2)
    for _ in range(5):
        x = rng.normal(size=(1, SLOW_WIDTH)).astype(np.float32)
        assert infer(client, "slow", {"x": x}).status_code == 200
        batch = rng.normal(size=(1, MLP_IN)).astype(np.float32)
        assert infer(client, "gathered", {"input": batch}).status_code == 200
    for model in ("slow", "gathered"):
        assert metric(server.url, "bnfold_run_batch_size_count", model=model) == 5
        assert metric(server.url, "bnfold_inline_runs_total", model=model) == 0


def test_inline_answers_are_bit_identical_to_run_thread_answers(client: httpx.Client) -> None:
    """`mlp` and `gathered` are the same files; one runs inline, the other on a run thread.
    Sequential requests: each runs alone either way, on the same rows."""
    rng = np.random.default_rng(3)
    for _ in range(REQUESTS):
        batch = rng.normal(size=(int(rng.integers(1, 5)), MLP_IN)).astype(np.float32)
        inline = v2_outputs(infer(client, "mlp", {"input": batch}))["output"]
        threaded = v2_outputs(infer(client, "gathered", {"input": batch}))["output"]
        assert inline.tobytes() == threaded.tobytes()


def test_a_run_that_fails_answers_422_alone_on_either_path(
    server: ServerProcess, client: httpx.Client
) -> None:
    """The failing request gets the 422 whichever path its run took (inline once the
    estimate says so; under pytest a run thread's first runs measured slow for long), and
    the run counts as every run does; the next requests are answered as before."""
    table = lookup_table()
    for index in range(20):
        answer = v2_outputs(infer(client, "lookup", {"index": np.array([index % 10], np.int64)}))
        np.testing.assert_array_equal(answer["row"], table[[index % 10]])
    runs = metric(server.url, "bnfold_run_batch_size_count", model="lookup")
    failed = infer(client, "lookup", {"index": np.array([99], np.int64)})
    assert failed.status_code == 422
    assert "onnxruntime could not run lookup" in failed.json()["error"]
    assert metric(server.url, "bnfold_run_batch_size_count", model="lookup") == runs + 1
    answer = v2_outputs(infer(client, "lookup", {"index": np.array([7, 2], np.int64)}))
    np.testing.assert_array_equal(answer["row"], table[[7, 2]])
    [stats] = client.get("/v2/models/lookup/stats").json()["model_stats"]
    assert stats["inference_stats"]["fail"]["count"] == 1
    assert stats["inference_stats"]["success"]["count"] == 21


# ---------------------------------------------------------------- the direct infer path


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/v2/models/mlp/infer", ("mlp", None)),
        ("/v2/models/mlp/versions/2/infer", ("mlp", "2")),
        ("/v2/models/stats/infer", ("stats", None)),
        ("/v2/models//infer", None),
        ("/v2/models/mlp/versions//infer", None),
        ("/v2/models/mlp/extra/infer", None),
        ("/v2/models/mlp/versions/2/extra/infer", None),
        ("/v2/models/mlp/compare", None),
        ("/v2/models/mlp/inference", None),
    ],
)
def test_inference_target_matches_the_infer_routes_only(
    path: str, target: tuple[str, str | None] | None
) -> None:
    assert inference_target(path) == target


def test_the_direct_infer_path_keeps_errors_request_ids_and_routing(
    client: httpx.Client,
) -> None:
    unknown = client.post(
        "/v2/models/nope/infer", json={"inputs": []}, headers={"X-Request-ID": "inline-test-1"}
    )
    assert unknown.status_code == 404
    assert unknown.headers["x-request-id"] == "inline-test-1"
    assert unknown.json() == {
        "error": unknown.json()["error"],
        "request_id": "inline-test-1",
    }
    assert "nope" in unknown.json()["error"]
    wrong_method = client.get("/v2/models/mlp/infer")
    assert wrong_method.status_code == 405
    assert "error" in wrong_method.json()
    no_route = client.post("/v2/models/mlp/extra/infer", json={})
    assert no_route.status_code == 404
    assert "error" in no_route.json()
    malformed = client.post(
        "/v2/models/mlp/versions/1/infer",
        content=b"{",
        headers={"Content-Type": "application/json"},
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"].startswith("malformed JSON")
    paths = client.get("/openapi.json").json()["paths"]
    assert "post" in paths["/v2/models/{model_name}/infer"]
    assert "post" in paths["/v2/models/{model_name}/versions/{model_version}/infer"]


# ---------------------------------------------------------------- the inline decision


def _estimate_at(ns: int, rows: int = 1) -> RunEstimate:
    """An estimate that has seen one run-thread run of `ns` CPU nanoseconds."""
    estimate = RunEstimate()
    estimate.observe(Execution(rows, 0, 2 * ns, 0, ns), inline=False)
    return estimate


def _decide(estimate: RunEstimate, limit: int, ran: bool = True) -> bool:
    """`estimate.inline`, and when it says yes and the run is made (`ran`), its start."""
    decision = estimate.inline(1, limit)
    if decision and ran:
        estimate.measures()
    return decision


def test_the_decision_runs_cheap_runs_inline_and_explores_the_middle() -> None:
    """Under the limit: always inline. Up to EXPLORE_FACTOR times it: one request in
    EXPLORE_EVERY. Above, or with nothing measured: never."""
    limit = 40_000
    cheap, middle, costly = (_estimate_at(ns) for ns in (39_000, 80_000, 160_000))
    assert all(cheap.inline(1, limit) for _ in range(100))
    decisions = [_decide(middle, limit) for _ in range(3 * RunEstimate.EXPLORE_EVERY)]
    assert [index for index, taken in enumerate(decisions) if taken] == [
        RunEstimate.EXPLORE_EVERY * k - 1 for k in (1, 2, 3)
    ]
    assert not any(costly.inline(1, limit) for _ in range(100))
    assert not any(RunEstimate().inline(1, limit) for _ in range(100))
    # rows scale the expectation: three rows of a cheap run's one are in the middle
    assert not cheap.inline(3, limit)


def _loop_run(cpu_ns: int) -> Execution:
    """An inline run of one row that read the CPU clock: `cpu_ns` (its wall time 3x that:
    the loop was preempted, which the estimate must not count)."""
    return Execution(1, 0, 3 * cpu_ns, 0, cpu_ns)


def test_an_exploring_run_measured_cheap_on_the_loop_decides_from_then_on() -> None:
    """Run threads' 80 µs runs keep a request off the loop but for one in EXPLORE_EVERY;
    once one such run measured 10 µs of CPU on the loop, the loop's mean decides: every
    request runs inline, and the run threads' costly merged runs (8 rows, 100 µs of
    CPU, as under load at 8 clients) no longer move the decision for one row."""
    estimate = _estimate_at(80_000)
    decisions = [_decide(estimate, 40_000) for _ in range(RunEstimate.EXPLORE_EVERY)]
    assert decisions.count(True) == 1 and decisions[-1]
    estimate.observe(_loop_run(10_000), inline=True)
    for _ in range(50):
        estimate.observe(Execution(8, 0, 120_000, 0, 100_000), inline=False)
    assert all(_decide(estimate, 40_000) for _ in range(4 * RunEstimate.EXPLORE_EVERY))
    assert not estimate.inline(8, 40_000)  # eight rows of a 10 µs row: 80 µs expected


def test_the_first_inline_run_counts_as_at_most_the_run_threads_mean() -> None:
    """Cold caches: a first inline run of 61 µs after run-thread runs of 30 µs counts as
    30 µs, so the next request runs inline; later inline runs count as measured."""
    estimate = _estimate_at(30_000)
    estimate.observe(_loop_run(61_000), inline=True)
    assert estimate.loop.ns == 30_000 and estimate.inline(1, 40_000)
    estimate.observe(_loop_run(20_000), inline=True)
    assert estimate.loop.ns == 25_000
    alone = RunEstimate()  # no run-thread run to compare with: taken as it came
    alone.observe(_loop_run(61_000), inline=True)
    assert alone.loop.ns == 61_000


def test_an_exploring_decision_the_queue_turned_away_is_retried_by_the_next_request() -> None:
    """Under load an exploring request often finds the queue busy and is submitted: the
    next request explores instead of waiting EXPLORE_EVERY more."""
    estimate = _estimate_at(80_000)
    decisions = [_decide(estimate, 40_000, ran=False) for _ in range(RunEstimate.EXPLORE_EVERY)]
    assert decisions[-1] and _decide(estimate, 40_000)  # turned away, then retried and run
    assert not any(_decide(estimate, 40_000) for _ in range(RunEstimate.EXPLORE_EVERY - 1))


def test_inline_runs_read_the_cpu_clock_to_explore_and_one_in_measure_every() -> None:
    """The clock is a system call: read by the first inline run, by exploring runs, and
    by every MEASURE_EVERY-th routine run; a run that did not read it (0 ns) is not
    counted in the mean."""
    estimate = RunEstimate()
    estimate.observe(Execution(1, 0, 50_000, 0, 30_000), inline=False)
    assert _decide(estimate, 40_000) and estimate.unmeasured == 0  # the first: measured
    estimate.observe(_loop_run(10_000), inline=True)
    reads = []
    for _ in range(3 * RunEstimate.MEASURE_EVERY):
        assert estimate.inline(1, 40_000)
        reads.append(estimate.measures())
        estimate.observe(Execution(1, 0, 10_000, 0, 0), inline=True)  # unread: ignored
    assert reads.count(True) == 3 and reads[RunEstimate.MEASURE_EVERY - 1]
    assert estimate.loop.ns == 10_000


def test_a_preempted_run_moves_the_mean_a_fraction_of_the_mean_at_most() -> None:
    """A 2 ms run among 10 µs ones (preempted, or waiting for the GIL) counts as twice the
    mean, `slower` of the way (an eighth; a 32nd for the loop's mean): the next run still
    goes inline. A model that really slowed down is followed, by that much a run."""
    mean = RunMean()
    mean.observe(10_000, 1)
    mean.observe(2_000_000, 1)
    assert mean.ns == 10_000 + 0.125 * 10_000
    estimate = RunEstimate()
    estimate.observe(_loop_run(10_000), inline=True)
    estimate.observe(_loop_run(2_000_000), inline=True)
    grown = 1 + RunEstimate.LOOP_SLOWER
    assert estimate.loop.ns == 10_000 * grown and estimate.inline(1, 40_000)
    runs = 0
    while estimate.inline(1, 40_000):
        estimate.observe(_loop_run(400_000), inline=True)
        runs += 1
    # from 10 µs x grown to at least 40 µs, x grown a run
    assert runs == math.ceil(math.log(40_000 / (10_000 * grown)) / math.log(grown))


def test_run_slots_hand_out_each_slot_once_until_given_back() -> None:
    """`RunSlots`: `concurrent_runs` slots between inline runs (take, or None) and run
    threads (wait); a thread waiting for a slot runs once one is given back."""
    slots = RunSlots(2)
    first, second = slots.take(), slots.take()
    assert {first, second} == {0, 1} and slots.take() is None
    taken: list[int] = []
    waiter = threading.Thread(target=lambda: taken.append(slots.wait()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not taken  # no slot free: the run thread waits
    assert first is not None
    slots.give(first)
    waiter.join(10)
    assert taken == [first] and slots.take() is None


def test_the_session_runner_of_a_cpu_session_answers_as_its_run_does(
    repository: Path,
) -> None:
    """`session_runner`: a CPU session's native run (none of the Python class's per-call
    checks), called as the batcher calls it, gives session.run's outputs bit for bit, and
    refuses input the graph cannot take with one of the errors the batcher maps to 422."""
    session = ort.InferenceSession(
        str(repository / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    run = session_runner(session)
    assert run is not session.run
    names = [output.name for output in session.get_outputs()]
    feeds = {"input": np.random.default_rng(5).normal(size=(3, MLP_IN)).astype(np.float32)}
    for got, expected in zip(run(names, feeds, None), session.run(names, feeds), strict=True):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(RUN_ERRORS):
        run(names, {"input": np.zeros((3, MLP_IN + 1), dtype=np.float32)}, None)
