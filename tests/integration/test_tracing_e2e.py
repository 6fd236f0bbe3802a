"""Tracing through Envoy with `--otlp-endpoint`: the engine receives a traceparent that
continues the client's trace below the gateway's span, and the span reaches a real OTLP
receiver (gRPC on loopback) with the routing decision."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.otlp_receiver import OtlpReceiver, ReceivedSpan
from gateway_extproc.routing.registry import PREDICTED_LATENCY
from tests.integration.stack import (
    CHAT_MODEL,
    PROCESSOR_ARGS,
    Gateway,
    Pod,
    Processor,
    add_processor,
    chat,
    post_json,
    running_gateway,
)

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def traced(
    receiver: OtlpReceiver,
    stack: tuple[dict[str, Pod], Processor, Path],
    log_dir: Path,
    child_env: dict[str, str],
) -> Iterator[Gateway]:
    """A processor of its own that traces (the shared one does not), behind an Envoy."""
    with localstack.ProcessGroup() as group:
        processor = add_processor(
            group,
            stack[2],
            log_dir,
            extra_args=[*PROCESSOR_ARGS, "--otlp-endpoint", receiver.endpoint],
            # The SDK's own knob: batches leave every 0.1 s instead of every 5 s.
            env={**child_env, "OTEL_BSP_SCHEDULE_DELAY": "100"},
            name="processor-traced",
        )
        localstack.wait_ready(group)
        with running_gateway(
            localstack.ENVOY_CONFIG, processor.grpc_port, log_dir, "envoy-traced"
        ) as gateway:
            yield gateway


def span_with_id(receiver: OtlpReceiver, span_id: str) -> ReceivedSpan:
    span = receiver.wait_for(lambda s: s.span_id == span_id)
    assert span is not None, f"no span {span_id} among {receiver.spans()}"
    return span


def test_the_engine_gets_a_child_of_the_clients_trace_and_the_span_is_exported(
    traced: Gateway, receiver: OtlpReceiver, pods: dict[str, Pod]
) -> None:
    response = chat(traced.port, CHAT_MODEL, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    assert response.status == 200
    version, trace_id, parent, flags = response.headers["x-simulator-traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "01")
    assert parent != CLIENT_SPAN  # the gateway's span sits between client and engine

    span = span_with_id(receiver, parent)
    assert (span.trace_id, span.parent_span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert span.service == "gateway-extproc"
    pod = pods[span.attributes["gateway.pod"].rpartition("-")[2]]
    assert span.attributes["gateway.pod.address"] == pod.address
    assert response.headers["x-simulator-pod"] == pod.address
    assert span.attributes["gateway.model"] == CHAT_MODEL
    assert span.attributes["gateway.strategy"] == PREDICTED_LATENCY  # no header: the default
    assert span.attributes["http.response.status_code"] == 200
    assert (
        span.attributes["gen_ai.usage.output_tokens"]
        == response.json()["usage"]["completion_tokens"]
    )
    assert span.status_code != ERROR


def test_a_request_without_trace_context_starts_a_trace(
    traced: Gateway, receiver: OtlpReceiver
) -> None:
    doc = {"model": CHAT_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    response = post_json(traced.port, "/v1/messages", doc)
    assert response.status == 200
    _, trace_id, parent, _ = response.headers["x-simulator-traceparent"].split("-")

    span = span_with_id(receiver, parent)
    assert (span.trace_id, span.parent_span_id) == (trace_id, "")
    assert span.attributes["gateway.api"] == "anthropic-messages"


def test_a_refused_request_is_an_error_span(traced: Gateway, receiver: OtlpReceiver) -> None:
    trace = "5bf92f3577b34da6a3ce929d0e0e4736"
    response = chat(traced.port, "no-such-model", {"traceparent": f"00-{trace}-{CLIENT_SPAN}-01"})
    assert response.status == 404

    span = receiver.wait_for(lambda s: s.trace_id == trace)
    assert span is not None
    assert span.status_code == ERROR
    assert span.attributes["gateway.error_code"] == "model_not_found"
    assert span.attributes["http.response.status_code"] == 404
