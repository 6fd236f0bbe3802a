"""The processor's Prometheus metrics agree with what clients saw: rejections are
counted, and a request stops being in flight once it is over, however it ended."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.stack import (
    CHAT_MODEL,
    LOCALHOST,
    Gateway,
    Processor,
    chat,
    poll,
)


def samples(processor: Processor, metric: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of `metric` by its sorted labels."""
    out = {}
    for family in text_string_to_metric_families(processor.metrics()):
        for sample in family.samples:
            if sample.name == metric:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def rejected_unknown_models(processor: Processor) -> float:
    # Unknown model names share the empty model label (clients cannot grow the series).
    labels = (("code", "model_not_found"), ("model", ""), ("status", "404"))
    return samples(processor, "gateway_requests_total").get(labels, 0.0)


def in_flight(processor: Processor) -> dict[tuple[tuple[str, str], ...], float]:
    return samples(processor, "gateway_in_flight_requests")


def observer_missing(processor: Processor) -> float:
    return sum(samples(processor, "gateway_observer_missing_total").values())


def test_a_404_is_counted_once(gateway: Gateway, processor: Processor) -> None:
    before = rejected_unknown_models(processor)

    assert chat(gateway.port, "no-such-model").status == 404

    after = poll(
        "the 404 is counted",
        lambda: rejected_unknown_models(processor),
        lambda value: value >= before + 1,
    )
    assert after == before + 1


def test_nothing_is_in_flight_after_requests_finish(gateway: Gateway, processor: Processor) -> None:
    assert chat(gateway.port, CHAT_MODEL).status == 200
    assert chat(gateway.port, CHAT_MODEL, stream=True).status == 200

    gauges = poll(
        "no request in flight",
        lambda: in_flight(processor),
        lambda seen: bool(seen) and sum(seen.values()) == 0,
    )
    # The routed requests were tracked per pod while they ran.
    assert {dict(labels)["model"] for labels in gauges} >= {CHAT_MODEL}


def long_chat(*, stream: bool) -> bytes:
    """A raw HTTP request for a completion of thousands of tokens (seconds of work)."""
    doc = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "stream": stream,
        "max_tokens": 5000,
    }
    body = json.dumps(doc).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {LOCALHOST}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def test_a_stream_the_client_abandons_is_no_longer_in_flight(
    gateway: Gateway, processor: Processor
) -> None:
    # Long enough (thousands of tokens at 2 ms) to still be running when the client
    # hangs up after the first event.
    with socket.create_connection((LOCALHOST, gateway.port), timeout=10) as sock:
        sock.sendall(long_chat(stream=True))
        received = b""
        while b"data: " not in received:
            data = sock.recv(65536)
            assert data, f"connection closed before the first event: {received!r}"
            received += data
        assert received.startswith(b"HTTP/1.1 200")
        poll(
            "the stream is in flight",
            lambda: sum(in_flight(processor).values()),
            lambda total: total == 1,
        )
    # The client is gone: Envoy resets the upstream and ends the ext_proc stream.
    poll(
        "the abandoned stream is released",
        lambda: sum(in_flight(processor).values()),
        lambda total: total == 0,
    )


def test_a_client_that_leaves_before_the_response_starts_is_released_at_once(
    gateway: Gateway, processor: Processor
) -> None:
    # A non-streamed completion of thousands of tokens: nothing comes back for seconds,
    # and the client gives up first (a client timeout while the engine works). With
    # envoy.yaml the response is seen by the observer filter, whose stream the request
    # headers open: it ends when the client leaves, long before the 10 s claim window.
    missing_before = observer_missing(processor)
    with socket.create_connection((LOCALHOST, gateway.port), timeout=10) as sock:
        sock.sendall(long_chat(stream=False))
        poll(
            "the request is in flight",
            lambda: sum(in_flight(processor).values()),
            lambda total: total == 1,
        )
    poll(
        "the abandoned request is released",
        lambda: sum(in_flight(processor).values()),
        lambda total: total == 0,
    )
    # Released by the client's leaving, not by the claim window running out (which
    # would count the observer stream as missing).
    assert observer_missing(processor) == missing_before


CANCELLED_STREAMS = 80


def hang_up_after(port: int, delay: float) -> None:
    """Send a long streamed completion and hang up `delay` seconds later, whatever has
    come back by then (nothing, the headers, some events)."""
    with socket.create_connection((LOCALHOST, port), timeout=10) as sock:
        sock.sendall(long_chat(stream=True))
        sock.settimeout(0.01)
        end = time.monotonic() + delay
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                if not sock.recv(65536):
                    return


def test_a_burst_of_cancelled_streams_is_counted_as_cancelled_and_released(
    gateway: Gateway, processor: Processor
) -> None:
    before = samples(processor, "gateway_requests_total")
    missing_before = observer_missing(processor)

    # Clients hang up at every stage: while Envoy asks the processor where to go, just
    # after the routing answer (before Envoy reaches the observer filter), and mid-stream.
    with ThreadPoolExecutor(CANCELLED_STREAMS) as pool:
        hang_ups = [(i % 20) * 0.05 for i in range(CANCELLED_STREAMS)]
        list(pool.map(lambda delay: hang_up_after(gateway.port, delay), hang_ups))

    poll(
        "every cancelled stream is released",
        lambda: sum(in_flight(processor).values()),
        lambda total: total == 0,
    )
    after = samples(processor, "gateway_requests_total")
    new = {
        dict(k)["status"] + " " + dict(k)["code"]: v - before.get(k, 0.0) for k, v in after.items()
    }
    new = {outcome: count for outcome, count in new.items() if count}
    print(f"{CANCELLED_STREAMS} streams cancelled: {new}")
    # Each one is a client's cancel: nothing recorded with no status (0), nothing taken
    # for a missing observer filter (which would also hold the pod for 10 s).
    assert set(new) == {"499 client_cancelled"}, new
    assert 0 < new["499 client_cancelled"] <= CANCELLED_STREAMS
    assert observer_missing(processor) == missing_before
