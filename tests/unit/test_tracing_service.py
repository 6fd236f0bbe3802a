"""Tracing in a started gateway over real gRPC: the span of a request that flow control
held says how long it waited, and the spans reach a real OTLP receiver on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from gateway_extproc.devtools.otlp_receiver import OtlpReceiver
from tests import frames
from tests.unit.test_flow_service import LLAMA, held, make_gateway, routed

__all__ = ["make_gateway"]  # the fixture, shared with the flow control tests


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # the SDK's batch delay, in ms
    with OtlpReceiver() as receiver:
        yield receiver


async def test_a_held_requests_span_carries_its_queue_wait(make_gateway, receiver):
    gateway = await make_gateway(otlp_endpoint=receiver.endpoint)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        first = await routed(channel, LLAMA, {"x-request-id": "first"})
        second = await held(channel, LLAMA, {"x-request-id": "second"})
        await first.finish_response()
        answer = await second.answer()
        assert frames.set_headers(answer)["traceparent"].startswith("00-")
        await second.finish_response()

    def span_of(request_id: str):
        span = receiver.wait_for(lambda s: s.attributes.get("gateway.request_id") == request_id)
        assert span is not None, receiver.spans()
        return span

    waited = span_of("second").attributes
    assert waited["gateway.queue_wait_ms"] > 0
    assert waited["gateway.routing_ms"] >= waited["gateway.queue_wait_ms"]
    assert waited["gateway.pod.address"] == "127.0.0.1:18001"
    assert "gateway.queue_wait_ms" not in span_of("first").attributes
