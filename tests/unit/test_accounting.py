"""Response accounting through the session: tokens, latency, the served pod."""

from __future__ import annotations

import orjson
import pytest
from prometheus_client import REGISTRY

from gateway_extproc import telemetry
from gateway_extproc.extproc.session import Session, SessionConfig
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.catalog import StrategyCatalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.router import Router
from tests import frames

POD_AT = {"10.9.0.1:8000": "acct-0", "10.9.0.2:8000": "acct-1"}


@pytest.fixture
def router() -> Router:
    registry = ModelRegistry()
    registry.replace_all(
        [Pod("acct-0", "10.9.0.1:8000", ("acct",)), Pod("acct-1", "10.9.0.2:8000", ("acct",))]
    )
    return Router(registry, StrategyCatalog(), "round-robin", InFlightCounter())


def tokens(pod: str, kind: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_tokens_total", {"model": "acct", "pod": pod, "kind": kind}
    )
    return value or 0.0


def routed(router: Router, config: SessionConfig | None = None, **body) -> tuple[Session, str]:
    session = Session(router, config or SessionConfig())
    session.handle(frames.request_headers())
    doc = {"model": "acct", "messages": [{"role": "user", "content": "hi"}], **body}
    out = session.handle(frames.request_body(orjson.dumps(doc)))
    return session, frames.set_headers(out[0])["target-pod"]


def sse_headers(status: int = 200):
    frame = frames.response_headers(status)
    frame.response_headers.headers.headers.add(key="content-type", raw_value=b"text/event-stream")
    return frame


def test_streamed_usage_is_counted_for_the_pod_that_served(router):
    session, pod_address = routed(router, stream=True)
    pod = POD_AT[pod_address]
    before = tokens(pod, "completion")
    session.handle(sse_headers())
    stream = (
        b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"y"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    for i in range(0, len(stream), 11):  # split mid-event on purpose
        session.handle(frames.response_body(stream[i : i + 11]))
    session.handle(frames.response_body(b"", end_of_stream=True))
    assert tokens(pod, "completion") == before + 2


def test_json_usage_is_parsed_once_at_end_of_stream(router):
    session, pod_address = routed(router)
    pod = POD_AT[pod_address]
    before = tokens(pod, "prompt")
    session.handle(frames.response_headers(200))
    body = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}})
    session.handle(frames.response_body(body[:10]))
    session.handle(frames.response_body(body[10:], end_of_stream=True))
    session.handle(frames.response_body(b"", end_of_stream=True))  # duplicate: ignored
    assert tokens(pod, "prompt") == before + 9


def test_a_plain_text_error_body_passes_untouched_and_is_counted(router):
    session, _ = routed(router)
    before = (
        REGISTRY.get_sample_value(
            "gateway_responses_unparsed_total", {"model": "acct", "reason": "not_json"}
        )
        or 0.0
    )
    session.handle(frames.response_headers(500))
    out = session.handle(frames.response_body(b"Internal Server Error", end_of_stream=True))
    assert out[0].response_body.ByteSize() == 0  # nothing changed for the client
    after = REGISTRY.get_sample_value(
        "gateway_responses_unparsed_total", {"model": "acct", "reason": "not_json"}
    )
    assert after == before + 1


def test_served_endpoint_metadata_moves_the_accounting_to_that_pod(router):
    session, pod_address = routed(router)
    (other,) = set(POD_AT) - {pod_address}
    other_pod = POD_AT[other]
    before = tokens(other_pod, "prompt")
    frame = frames.response_headers(200)
    frame.metadata_context.filter_metadata["envoy.lb"]["x-gateway-destination-endpoint-served"] = (
        other
    )
    session.handle(frame)
    body = orjson.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 0}})
    session.handle(frames.response_body(body, end_of_stream=True))
    assert tokens(other_pod, "prompt") == before + 3
    assert router.inflight.total() == 0  # the pick's count was released all the same


def test_include_usage_is_injected_only_when_asked_and_content_length_follows(router):
    config = SessionConfig(inject_include_usage=True)
    session = Session(router, config)
    session.handle(frames.request_headers())
    body = orjson.dumps({"model": "acct", "stream": True, "prompt": "p"})
    out = session.handle(frames.request_body(body))[0]
    new_body = out.request_body.response.body_mutation.body
    assert orjson.loads(new_body)["stream_options"] == {"include_usage": True}
    assert frames.set_headers(out)["content-length"] == str(len(new_body))
    # Without the option, or for a non-streaming request, the body is not touched.
    for cfg, doc in (
        (SessionConfig(), {"model": "acct", "stream": True}),
        (config, {"model": "acct"}),
        (config, {"model": "acct", "stream": True, "stream_options": {"include_usage": True}}),
    ):
        session = Session(router, cfg)
        session.handle(frames.request_headers())
        out = session.handle(frames.request_body(orjson.dumps(doc)))[0]
        assert not out.request_body.response.HasField("body_mutation")


def test_deleting_a_pod_drops_its_series(router):
    session, pod_address = routed(router)
    session.handle(frames.response_headers(200))
    body = orjson.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    session.handle(frames.response_body(body, end_of_stream=True))
    pod = POD_AT[pod_address]
    assert tokens(pod, "prompt") > 0
    telemetry.forget_pod_series(pod)
    sample = REGISTRY.get_sample_value(
        "gateway_tokens_total", {"model": "acct", "pod": pod, "kind": "prompt"}
    )
    assert sample is None
    assert (
        REGISTRY.get_sample_value("gateway_in_flight_requests", {"model": "acct", "pod": pod})
        is None
    )


# -- Envoy skipping the response headers phase (envoy/envoy.yaml) ------------------------

SSE_STREAM = (
    b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n'
    b"data: [DONE]\n\n"
)


def with_status(frame, status: float):
    """A frame carrying the response attribute envoy/envoy.yaml asks Envoy for."""
    frame.attributes["envoy.filters.http.ext_proc"]["response.code"] = status
    return frame


def requests_counted(status: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_requests_total", {"model": "acct", "status": status, "code": ""}
    )
    return value or 0.0


def test_without_response_headers_the_status_comes_from_the_attribute(router):
    session, pod_address = routed(router, stream=True)
    pod = POD_AT[pod_address]
    before_tokens, before_201 = tokens(pod, "prompt"), requests_counted("201")
    first = with_status(frames.response_body(SSE_STREAM[:3]), 201)  # "dat": too short to tell
    assert only_continue(session.handle(first))
    assert router.inflight.total() == 1  # the response is under way
    session.handle(frames.response_body(SSE_STREAM[3:]))
    session.handle(frames.response_body(b"", end_of_stream=True))
    assert tokens(pod, "prompt") == before_tokens + 5
    assert requests_counted("201") == before_201 + 1
    assert router.inflight.total() == 0
    # A frame after the end changes nothing.
    assert only_continue(session.handle(frames.response_body(SSE_STREAM, end_of_stream=True)))
    assert tokens(pod, "prompt") == before_tokens + 5


def test_without_response_headers_or_attribute_an_sse_stream_is_recognised(router):
    session, pod_address = routed(router, stream=True)
    pod = POD_AT[pod_address]
    before = tokens(pod, "completion")
    session.handle(frames.response_body(SSE_STREAM, end_of_stream=True))
    assert tokens(pod, "completion") == before + 1
    assert router.inflight.total() == 0


def test_without_response_headers_a_json_body_is_parsed_at_the_end(router):
    session, pod_address = routed(router)
    pod = POD_AT[pod_address]
    before = tokens(pod, "prompt")
    body = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 1}})
    session.handle(with_status(frames.response_body(body), 200))
    session.handle(frames.response_body(b"", end_of_stream=True))
    assert tokens(pod, "prompt") == before + 7


def test_an_error_status_from_the_attributes_is_what_gets_counted(router):
    session, _ = routed(router)
    before = requests_counted("503")
    error = b'{"error": {"message": "upstream connect error", "code": "uf"}}'
    session.handle(with_status(frames.response_body(error, True), 503))
    assert requests_counted("503") == before + 1
    assert router.inflight.total() == 0


def only_continue(out) -> bool:
    return len(out) == 1 and out[0].HasField("response_body") and out[0].ByteSize() == 2
