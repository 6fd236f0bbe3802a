"""Flow control end to end: what clients notice when the fleet is over capacity.

Real processes throughout (flow_stack.py): simulated engines that run two requests at
once, processors allowing two requests in flight per pod (four for the fleet), real
Envoys. Every request goes through Envoy.

- over capacity, the engines never queue and every request is answered 200 or 429,
  never 5xx: the excess waits in the processor;
- a light tenant gets about half the fleet against a tenant sending five times more;
- high priority waits less than low; a held queue leaves in priority order, but not for
  a priority header the platform ignores; sheddable requests are refused at once;
- a request held past Envoy's own message timeout gets 429 queue_timeout, not 504;
- a client that leaves while queued is dropped at once;
- a model whose only pod turns ready 2 s after the request arrived serves it;
- a tenant over its request limit gets OpenAI's 429 and x-ratelimit-* headers;
- the full-duplex Envoy receives the token counts as dynamic metadata;
- with envoy/examples/platform-headers.yaml before the processor, the platform's
  priority replaces the client's.

Loads are bounded (a fixed number of requests, a time budget). Assertions are on shares
and orderings with wide margins; each carries what was measured.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gateway_extproc.devtools import localstack
from tests.integration.flow_stack import (
    FLOW_MODEL,
    FULL_DUPLEX,
    IGNORING,
    QUEUE_TIMEOUT,
    SLOTS,
    TRUSTING,
    ZERO_MODEL,
    EngineQueueWatch,
    FlowFleet,
    metric_total,
    models_doc,
    queue_length,
    running_flow_fleet,
)
from tests.integration.stack import DEADLINE, LOCALHOST, Response, poll, running_gateway
from tests.integration.strategy_stack import HeldStream, chat_doc, hold_streams, post_json

REPLY_TOKENS = 8  # 20 ms + 7 x 5 ms of engine time per request
# For the share and priority runs: 20 ms + 39 x 5 ms, long against a client's own turn
# around (read the answer, send the next request), which a loaded machine stretches.
LONG_REPLY_TOKENS = 40
HOLD_TOKENS = 4000  # a held stream runs for 20 s unless closed first
LOAD_BUDGET = 60.0


@pytest.fixture(scope="module")
def fleet(log_dir: Path, child_env: dict[str, str]) -> Iterator[FlowFleet]:
    with running_flow_fleet(log_dir, child_env) as fleet:
        yield fleet


def send(fleet: FlowFleet, headers: Mapping[str, str] | None = None, via: str = TRUSTING,
         model: str = FLOW_MODEL, tokens: int = REPLY_TOKENS) -> Response:  # fmt: skip
    doc = chat_doc(model, max_tokens=tokens)
    return post_json(fleet.gateways[via].port, "/v1/chat/completions", doc, dict(headers or {}))


@contextlib.contextmanager
def fleet_full(fleet: FlowFleet, via: str = TRUSTING) -> Iterator[list[HeldStream]]:
    """Every slot of the fleet taken by a held stream until the block ends."""
    port = fleet.gateways[via].port
    held = hold_streams(port, SLOTS, chat_doc(FLOW_MODEL, max_tokens=HOLD_TOKENS), {})
    try:
        yield held
    finally:
        for stream in held:
            stream.close()


@dataclass(frozen=True)
class Outcome:
    group: str
    status: int
    seconds: float


def closed_loop(
    fleet: FlowFleet,
    groups: Mapping[str, tuple[int, Mapping[str, str]]],
    *,
    total: int,
    tokens: int = REPLY_TOKENS,
) -> list[Outcome]:
    """Clients per group (count, headers), each sending its next request as soon as the
    last is answered, until `total` requests were answered (or the budget is spent).

    Returns the first `total` outcomes, in the order they were answered: the requests
    still under way when the count was reached are answered as the queue drains, with
    every client's last request in it, not in the shares being measured."""
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + LOAD_BUDGET

    def client(group: str, headers: Mapping[str, str]) -> None:
        while time.monotonic() < deadline:
            with lock:
                if len(outcomes) >= total:
                    return
            started = time.monotonic()
            response = send(fleet, headers, tokens=tokens)
            with lock:
                outcomes.append(Outcome(group, response.status, time.monotonic() - started))

    clients = [(g, h) for g, (n, h) in groups.items() for _ in range(n)]
    with ThreadPoolExecutor(len(clients)) as pool:
        for future in [pool.submit(client, g, h) for g, h in clients]:
            future.result()
    if len(outcomes) < total:
        pytest.fail(f"only {len(outcomes)} of {total} requests answered in {LOAD_BUDGET}s")
    return outcomes[:total]


def p90(outcomes: list[Outcome], group: str) -> float:
    times = sorted(o.seconds for o in outcomes if o.group == group)
    return times[int(0.9 * (len(times) - 1))]


# -- saturation ---------------------------------------------------------------------------


def test_over_capacity_engines_never_queue_and_the_excess_waits_never_5xx(fleet):
    processor = fleet.processors[TRUSTING]
    waited_before = metric_total(
        processor, "gateway_flow_queue_wait_seconds_count", model=FLOW_MODEL
    )
    engines = [fleet.engines["a"], fleet.engines["b"]]
    with EngineQueueWatch(engines) as watch:
        outcomes = closed_loop(fleet, {"load": (16, {})}, total=120)
    statuses = Counter(o.status for o in outcomes)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= 100, statuses
    # Each engine runs two at once and gets at most two: nothing ever waits in it.
    assert watch.samples > 10
    assert watch.peak == 0, f"an engine queued {watch.peak} requests"
    waited = (
        metric_total(processor, "gateway_flow_queue_wait_seconds_count", model=FLOW_MODEL)
        - waited_before
    )
    assert waited >= 50, f"only {waited} of 120 requests waited in the processor"


def test_a_light_tenant_gets_its_share_against_one_sending_five_times_more(fleet):
    tenant = "x-gateway-inference-fairness-id"
    outcomes = closed_loop(
        fleet,
        {"heavy": (20, {tenant: "heavy"}), "light": (4, {tenant: "light"})},
        total=160,
        tokens=LONG_REPLY_TOKENS,
    )
    assert {o.status for o in outcomes} == {200}
    served = Counter(o.group for o in outcomes)
    light_share = served["light"] / len(outcomes)
    # In arrival order the light tenant would get 4 of 24 turns (17%); taking turns, half.
    assert light_share >= 0.40, f"light tenant served {served}"
    assert p90(outcomes, "light") <= p90(outcomes, "heavy"), (
        f"light p90 {p90(outcomes, 'light'):.3f}s, heavy p90 {p90(outcomes, 'heavy'):.3f}s"
    )


def test_high_priority_waits_less_than_low_under_saturation(fleet):
    outcomes = closed_loop(
        fleet,
        {"high": (3, {"x-gateway-inference-objective": "critical"}), "low": (12, {})},
        total=150,
        tokens=LONG_REPLY_TOKENS,
    )
    assert {o.status for o in outcomes} == {200}
    high, low = p90(outcomes, "high"), p90(outcomes, "low")
    assert high <= 0.5 * low, f"high p90 {high:.3f}s, low p90 {low:.3f}s"


def queue_in_order(
    fleet: FlowFleet, via: str, sends: list[tuple[str, dict[str, str]]]
) -> list[str]:
    """With the fleet full, queue `sends` one after another, then free one slot: the
    queued requests pass through it one at a time, so they finish in the order the
    processor let them go. Returns the names in the order their 200s came."""
    owner = TRUSTING if via == FULL_DUPLEX else via
    processor = fleet.processors[owner]
    finished: list[str] = []
    lock = threading.Lock()

    def one(name: str, headers: dict[str, str]) -> None:
        response = send(fleet, headers, via=via)
        assert response.status == 200, (name, response.status, response.body)
        with lock:
            finished.append(name)

    with fleet_full(fleet, via) as held, ThreadPoolExecutor(len(sends)) as pool:
        futures = []
        for count, (name, headers) in enumerate(sends, start=1):
            futures.append(pool.submit(one, name, headers))
            poll(
                f"{name} is queued",
                lambda: queue_length(processor, FLOW_MODEL),
                lambda length, count=count: length == count,
            )
        held[0].close()  # one slot frees; each queued request takes it in turn
        for future in futures:
            future.result()
    return finished


@pytest.mark.parametrize(("via", "pushy_place"), [(TRUSTING, 0), (IGNORING, 2)])
def test_a_queue_leaves_in_priority_order_unless_the_header_is_ignored(fleet, via, pushy_place):
    order = queue_in_order(
        fleet,
        via,
        [("first", {}), ("second", {}), ("pushy", {"x-gateway-priority": "100"})],
    )
    # Trusted, priority 100 goes ahead of those queued before it; ignored, it waits its turn.
    assert order.index("pushy") == pushy_place, order
    assert [name for name in order if name != "pushy"] == ["first", "second"]


def test_sheddable_requests_are_refused_at_once_and_others_time_out_with_429(fleet):
    with fleet_full(fleet):
        for headers in ({"x-gateway-inference-objective": "batch"}, {"x-gateway-priority": "-5"}):
            response = send(fleet, headers)
            assert response.status == 429, response
            assert response.error_code() == "request_shed"
            assert response.headers["retry-after"]
        # Held past QUEUE_TIMEOUT (longer than Envoy's 5 s message_timeout, which the
        # processor extends for held requests): its 429, not Envoy's 504. The same
        # through the full-duplex Envoy, where no message timer runs at all.
        with ThreadPoolExecutor(2) as pool:
            waits = [pool.submit(send, fleet, {}, via) for via in (TRUSTING, FULL_DUPLEX)]
            for response in (w.result() for w in waits):
                assert response.status == 429, response
                assert response.error_code() == "queue_timeout"
                assert response.headers["retry-after"]
    assert QUEUE_TIMEOUT > 5.0


def test_a_client_that_leaves_while_queued_is_dropped_at_once(fleet):
    processor = fleet.processors[TRUSTING]
    abandoned = metric_total(processor, "gateway_flow_abandoned_total", model=FLOW_MODEL)
    with fleet_full(fleet):
        port = fleet.gateways[TRUSTING].port
        sock = socket.create_connection((LOCALHOST, port), timeout=DEADLINE)
        body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % (
            FLOW_MODEL.encode()
        )
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json"
            b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        poll("the request is queued", lambda: queue_length(processor, FLOW_MODEL), lambda n: n == 1)
        sock.close()
        poll(
            "the queue let go of it", lambda: queue_length(processor, FLOW_MODEL), lambda n: n == 0
        )
    assert metric_total(processor, "gateway_flow_abandoned_total", model=FLOW_MODEL) == (
        abandoned + 1
    )
    assert send(fleet).status == 200  # nothing was left holding a slot


# -- scale from zero --------------------------------------------------------------------


def test_a_model_whose_only_pod_turns_ready_two_seconds_later_serves_the_request(fleet):
    processor = fleet.processors[TRUSTING]
    try:
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            answer = pool.submit(send, fleet, {}, TRUSTING, ZERO_MODEL)
            poll(
                "it waits for a pod", lambda: queue_length(processor, ZERO_MODEL), lambda n: n == 1
            )
            # The pod turns ready 2 s after the request came (the scenario, not a wait).
            time.sleep(max(0.0, 2.0 - (time.monotonic() - started)))
            fleet.models.write(models_doc(fleet.engines, zero_state="ready"))
            response = answer.result(timeout=DEADLINE)
        assert response.status == 200, response
        assert response.headers["x-simulator-pod"] == fleet.engines["z"].address
    finally:
        fleet.models.restore()


# -- per-tenant limits and what Envoy receives ------------------------------------------


def test_a_tenant_over_its_request_limit_gets_openais_429(fleet):
    processor = fleet.processors[TRUSTING]
    tokens_before = metric_total(processor, "gateway_tenant_tokens_total", tenant="metered")
    metered = {"x-gateway-inference-fairness-id": "metered"}
    assert [send(fleet, metered).status for _ in range(3)] == [200, 200, 200]
    refused = send(fleet, metered)
    assert refused.status == 429
    assert refused.error_code() == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "requests"
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # Others are not limited by that tenant's count.
    assert send(fleet, {"x-gateway-inference-fairness-id": "someone"}).status == 200
    assert metric_total(processor, "gateway_tenant_tokens_total", tenant="metered") > (
        tokens_before
    )


def test_the_full_duplex_envoy_receives_the_token_counts(fleet):
    request_id = f"flow-tokens-{time.time_ns()}"
    response = send(fleet, {"x-request-id": request_id}, via=FULL_DUPLEX)
    assert response.status == 200
    total = response.json()["usage"]["total_tokens"]
    envoy = fleet.gateways[FULL_DUPLEX].process

    def access_line() -> str:
        lines = envoy.log_path.read_text(errors="replace").splitlines()
        return next((line for line in lines if f"id={request_id}" in line), "")

    line = poll("Envoy logged the request", access_line, bool)
    assert f"tokens={total}" in line, line


def test_a_platform_header_filter_replaces_the_clients_priority(fleet, log_dir):
    # envoy.yaml with the shipped example filter put before the processor's filters.
    doc = yaml.safe_load(localstack.ENVOY_CONFIG.read_text())
    example = yaml.safe_load(
        (localstack.REPO_ROOT / "envoy/examples/platform-headers.yaml").read_text()
    )
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    manager["typed_config"]["http_filters"].insert(0, example)
    config = log_dir / "envoy-platform-headers-source.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    processor = fleet.processors[TRUSTING]
    with running_gateway(config, processor.grpc_port, log_dir, "envoy-platform") as gateway:
        doc = chat_doc(FLOW_MODEL, max_tokens=REPLY_TOKENS)
        path = "/v1/chat/completions"
        assert post_json(gateway.port, path, doc, {"x-gateway-priority": "100"}).status == 200
        with fleet_full(fleet):
            # The client asks for 100; the platform says -1 (sheddable): refused at once.
            response = post_json(gateway.port, path, doc, {"x-gateway-priority": "100"})
            assert response.status == 429, response
            assert response.error_code() == "request_shed"
