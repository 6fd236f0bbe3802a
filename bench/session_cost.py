"""The CPU one request costs in the session alone (no gRPC, no Envoy), with tracing off
and on: for the overhead section's note on what tracing adds to the hot path.

A request is its four frames as the shipped Envoy sends them (request headers, the
buffered body, response headers, the response body's end), driven straight into a
`Session` in this process; CPU is `time.process_time()` (every thread, so the span
exporter's thread is counted). The `is None` test that is all tracing costs when off is
timed on its own too.
"""

from __future__ import annotations

import time
import timeit
from typing import Any

from bench import payloads
from gateway_extproc.extproc.session import Session, SessionConfig
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.catalog import StrategyCatalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.router import Router
from gateway_extproc.tracing import Tracer
from tests import frames  # the frames Envoy sends, as the unit tests build them

REQUESTS = 20_000


def _router() -> Router:
    registry = ModelRegistry()
    registry.replace_all([Pod("pod-0", "127.0.0.1:8000", (payloads.BENCH_MODEL,))])
    return Router(registry, StrategyCatalog(), "random", InFlightCounter())


def cpu_per_request_us(config: SessionConfig, requests: int) -> float:
    router = _router()
    request_frames = [
        # As Envoy sends them: a request id set, and here a client's trace context.
        frames.request_headers(
            headers={
                "x-request-id": "5f1c0e1f-3b7e-4f3c-9a51-3cf0d6a2b9e4",
                "traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01",
            }
        ),
        frames.request_body(payloads.chat_request()),
        frames.response_headers(200),
        frames.response_body(payloads.chat_completion(), end_of_stream=True),
    ]
    for _ in range(200):  # warm-up
        _drive(router, config, request_frames)
    started = time.process_time()
    for _ in range(requests):
        _drive(router, config, request_frames)
    return (time.process_time() - started) / requests * 1e6


def _drive(router: Router, config: SessionConfig, request_frames: list[Any]) -> None:
    session = Session(router, config)
    for frame in request_frames:
        session.handle(frame)


def measure(otlp_endpoint: str, requests: int = REQUESTS) -> dict[str, float]:
    off = SessionConfig(access_log=False)
    tracer = Tracer(otlp_endpoint)
    try:
        on = SessionConfig(access_log=False, tracer=tracer)
        results = {
            "off_us": cpu_per_request_us(off, requests),
            "on_us": cpu_per_request_us(on, requests),
        }
    finally:
        tracer.shutdown()
    checks = timeit.repeat("c.tracer is not None", globals={"c": off}, number=1_000_000, repeat=5)
    results["check_ns"] = min(checks) * 1e3  # per test, in ns (1e6 tests per run)
    results["requests"] = requests
    return results
