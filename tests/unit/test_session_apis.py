"""The session with the other APIs (OpenAI Responses, Anthropic Messages), model aliases
and tracing: errors in the caller's API's shape, usage counted from each API's stream,
alias targets written into the body, and a span per request sent to a real OTLP receiver
over loopback gRPC."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import orjson
import pytest
from prometheus_client import REGISTRY

from gateway_extproc.devtools.otlp_receiver import OtlpReceiver
from gateway_extproc.extproc.envoy_names import HANDOFF_CONTEXT_FIELDS, HANDOFF_NAMESPACE
from gateway_extproc.extproc.session import Outcome, Session, SessionConfig
from gateway_extproc.models.aliases import Alias
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.catalog import StrategyCatalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.router import Router
from gateway_extproc.tracing import Tracer
from tests import frames

MESSAGES = {"model": "api", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "api", "input": "hi"}
CHAT = {"model": "api", "messages": [{"role": "user", "content": "hi"}]}
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@pytest.fixture
def registry() -> ModelRegistry:
    registry = ModelRegistry()
    registry.replace_all(
        [
            Pod("api-0", "10.8.0.1:8000", ("api",)),
            Pod("v2-0", "10.8.0.2:8000", ("v2",)),
            Pod("v3-0", "10.8.0.3:8000", ("v3",)),
            Pod("cold-0", "10.8.0.4:8000", ("cold",), ready=False),
        ]
    )
    return registry


@pytest.fixture
def router(registry: ModelRegistry) -> Router:
    return Router(registry, StrategyCatalog(), "random", InFlightCounter(), retry_after=3)


def send(session: Session, path: str, doc: dict, **headers: str):
    session.handle(frames.request_headers(path, headers=headers))
    return session.handle(frames.request_body(orjson.dumps(doc)))[0]


def immediate_body(response) -> tuple[int, dict]:
    assert response.WhichOneof("response") == "immediate_response"
    return response.immediate_response.status.code, orjson.loads(response.immediate_response.body)


def tokens(model: str, pod: str, kind: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_tokens_total", {"model": model, "pod": pod, "kind": kind}
    )
    return value or 0.0


def sse_headers():
    frame = frames.response_headers(200)
    frame.response_headers.headers.headers.add(key="content-type", raw_value=b"text/event-stream")
    return frame


def event(kind: str, payload: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload})


# -- errors in the shape of the API called ------------------------------------------------


def test_unknown_model_on_messages_is_an_anthropic_not_found_error(router):
    status, body = immediate_body(
        send(Session(router, SessionConfig()), "/v1/messages", {**MESSAGES, "model": "nope"})
    )
    assert status == 404
    assert body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model `nope` does not exist."},
    }


def test_bad_json_and_unready_models_on_messages_are_anthropic_errors(router):
    session = Session(router, SessionConfig())
    session.handle(frames.request_headers("/v1/messages"))
    status, body = immediate_body(session.handle(frames.request_body(b"{not json"))[0])
    assert (status, body["type"], body["error"]["type"]) == (400, "error", "invalid_request_error")
    response = send(Session(router, SessionConfig()), "/v1/messages", {**MESSAGES, "model": "cold"})
    status, body = immediate_body(response)
    assert (status, body["error"]["type"]) == (503, "overloaded_error")
    assert frames.set_headers(response)["retry-after"] == "3"


def test_unknown_model_on_responses_is_an_openai_error(router):
    status, body = immediate_body(
        send(Session(router, SessionConfig()), "/v1/responses", {**RESPONSES, "model": "nope"})
    )
    assert status == 404
    assert body["error"]["code"] == "model_not_found"


# -- usage from each API's stream ---------------------------------------------------------


def test_messages_stream_tokens_are_counted(router):
    session = Session(router, SessionConfig())
    assert send(session, "/v1/messages", {**MESSAGES, "stream": True}).HasField("request_body")
    before = tokens("api", "api-0", "prompt"), tokens("api", "api-0", "completion")
    session.handle(sse_headers())
    start = {
        "message": {"id": "m", "content": [], "usage": {"input_tokens": 13, "output_tokens": 1}}
    }
    delta = {"index": 0, "delta": {"type": "text_delta", "text": "hey"}}
    for chunk in (
        event("message_start", start) + b"\n\n" + event("content_block_start", {"index": 0}),
        b"\n\n" + event("content_block_delta", delta) + b"\n\n",
        event(
            "message_delta", {"delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 4}}
        ),
        b"\n\n" + event("message_stop", {}) + b"\n\n",
    ):
        session.handle(frames.response_body(chunk))
    session.handle(frames.response_body(b"", end_of_stream=True))
    assert session.outcome is Outcome.FINISHED
    after = tokens("api", "api-0", "prompt"), tokens("api", "api-0", "completion")
    assert (after[0] - before[0], after[1] - before[1]) == (13, 4)


def test_responses_json_tokens_are_counted(router):
    session = Session(router, SessionConfig())
    send(session, "/v1/responses", RESPONSES)
    before = tokens("api", "api-0", "completion")
    session.handle(frames.response_headers(200))
    body = {"object": "response", "usage": {"input_tokens": 5, "output_tokens": 9}}
    session.handle(frames.response_body(orjson.dumps(body), end_of_stream=True))
    assert tokens("api", "api-0", "completion") - before == 9


def test_include_usage_is_not_injected_into_apis_that_always_report_it(router):
    config = SessionConfig(inject_include_usage=True)
    for path, doc in (("/v1/messages", MESSAGES), ("/v1/responses", RESPONSES)):
        routed = send(Session(router, config), path, {**doc, "stream": True})
        assert not routed.request_body.response.HasField("body_mutation")


# -- aliases ------------------------------------------------------------------------------


def alias_requests(alias: str, target: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_alias_requests_total", {"alias": alias, "target": target}
    )
    return value or 0.0


def routed_body(response) -> tuple[dict, dict[str, str]]:
    common = response.request_body.response
    return orjson.loads(common.body_mutation.body), frames.set_headers(response)


def test_alias_requests_go_to_targets_by_weight_with_the_body_rewritten(router, registry):
    registry.set_aliases({"llama": Alias("llama", (("v2", 9), ("v3", 1)))})
    before = alias_requests("llama", "v3")
    seen: Counter[str] = Counter()
    for _ in range(50):
        response = send(
            Session(router, SessionConfig()), "/v1/chat/completions", {**CHAT, "model": "llama"}
        )
        body, headers = routed_body(response)
        seen[body["model"]] += 1
        expected = {"v2": "10.8.0.2:8000", "v3": "10.8.0.3:8000"}[body["model"]]
        assert headers["x-gateway-destination-endpoint"] == expected
        assert headers["content-length"] == str(len(orjson.dumps(body)))
        assert body["messages"] == CHAT["messages"]
    assert seen == {"v2": 45, "v3": 5}  # weighted round robin holds the split exactly
    assert alias_requests("llama", "v3") - before == 5


def test_alias_rewrite_and_include_usage_injection_share_one_body(router, registry):
    registry.set_aliases({"llama": Alias("llama", (("v2", 1),))})
    response = send(
        Session(router, SessionConfig(inject_include_usage=True)),
        "/v1/chat/completions",
        {**CHAT, "model": "llama", "stream": True},
    )
    body, _ = routed_body(response)
    assert body["model"] == "v2"
    assert body["stream_options"] == {"include_usage": True}


def test_alias_targets_that_are_absent_are_skipped(router, registry):
    registry.set_aliases({"llama": Alias("llama", (("gone", 50), ("v3", 1)))})
    for _ in range(5):
        body, _ = routed_body(
            send(Session(router, SessionConfig()), "/v1/messages", {**MESSAGES, "model": "llama"})
        )
        assert body["model"] == "v3"


def test_alias_whose_targets_are_all_absent_is_404_in_the_apis_shape(router, registry):
    registry.set_aliases({"llama": Alias("llama", (("gone", 1), ("also-gone", 1)))})
    status, body = immediate_body(
        send(Session(router, SessionConfig()), "/v1/messages", {**MESSAGES, "model": "llama"})
    )
    assert status == 404
    assert body["error"] == {
        "type": "not_found_error",
        "message": "The model `llama` does not exist.",
    }


def test_alias_with_only_unready_targets_gets_their_503(router, registry):
    registry.set_aliases({"llama": Alias("llama", (("gone", 1), ("cold", 1)))})
    status, body = immediate_body(
        send(Session(router, SessionConfig()), "/v1/chat/completions", {**CHAT, "model": "llama"})
    )
    assert (status, body["error"]["code"]) == (503, "no_ready_pods")


def test_alias_named_in_the_model_header_routes_to_a_target(router, registry):
    registry.set_aliases({"llama": Alias("llama", (("v3", 1),))})
    session = Session(router, SessionConfig())
    config = frames.protocol(frames.Mode.STREAMED)
    routed = session.handle(
        frames.request_headers(headers={"x-gateway-model-name": "llama"}, config=config)
    )[0]
    assert frames.set_headers(routed)["x-gateway-destination-endpoint"] == "10.8.0.3:8000"


# -- tracing ------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def test_tracing_off_leaves_the_clients_traceparent_alone(router):
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    routed = send(
        Session(router, SessionConfig()), "/v1/chat/completions", CHAT, traceparent=traceparent
    )
    assert "traceparent" not in frames.set_headers(routed)


def test_a_span_per_request_is_a_child_of_the_clients_and_the_parent_of_upstreams(router, receiver):
    tracer = Tracer(receiver.endpoint)
    session = Session(router, SessionConfig(tracer=tracer))
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    routed = send(session, "/v1/messages", MESSAGES, traceparent=traceparent)
    upstream = frames.set_headers(routed)["traceparent"]
    version, trace_id, span_id, flags = upstream.split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "01")
    assert span_id != CLIENT_SPAN
    session.handle(frames.response_headers(200))
    body = {"type": "message", "usage": {"input_tokens": 6, "output_tokens": 4}}
    session.handle(frames.response_body(orjson.dumps(body), end_of_stream=True))
    tracer.shutdown()
    span = receiver.wait_for(lambda s: s.trace_id == CLIENT_TRACE)
    assert span is not None
    assert (span.span_id, span.parent_span_id) == (span_id, CLIENT_SPAN)
    attributes = span.attributes
    assert attributes["gateway.model"] == "api"
    assert attributes["gateway.strategy"] == "random"
    assert attributes["gateway.pod"] == "api-0"
    assert attributes["gateway.pod.address"] == "10.8.0.1:8000"
    assert attributes["gateway.api"] == "anthropic-messages"
    assert attributes["http.response.status_code"] == 200
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (
        6,
        4,
    )
    assert span.status_code != 2  # not an error


def test_a_request_without_traceparent_starts_a_trace_and_a_refusal_is_an_error_span(
    router, registry, receiver
):
    registry.set_aliases({"llama": Alias("llama", (("v3", 1),))})
    tracer = Tracer(receiver.endpoint)
    session = Session(router, SessionConfig(tracer=tracer))
    routed = send(session, "/v1/chat/completions", {**CHAT, "model": "llama"})
    session.handle(frames.response_headers(200, end_of_stream=True))
    _, trace_id, span_id, _ = frames.set_headers(routed)["traceparent"].split("-")
    rejected = Session(router, SessionConfig(tracer=tracer))
    send(rejected, "/v1/chat/completions", {**CHAT, "model": "nope"})
    rejected.close()
    Session(router, SessionConfig(tracer=tracer)).close()  # no request seen: no span
    tracer.shutdown()
    root = receiver.wait_for(lambda s: s.span_id == span_id)
    assert root is not None and root.trace_id == trace_id and root.parent_span_id == ""
    assert (root.attributes["gen_ai.request.model"], root.attributes["gateway.model"]) == (
        "llama",
        "v3",
    )
    assert root.attributes["gateway.alias"] == "llama"
    refused = receiver.wait_for(
        lambda s: s.attributes.get("gateway.error_code") == "model_not_found"
    )
    assert refused is not None
    assert refused.status_code == 2
    assert refused.attributes["http.response.status_code"] == 404
    assert "gateway.pod" not in refused.attributes
    assert len(receiver.spans()) == 2


def test_the_access_log_names_the_alias_asked_for_and_the_target_served(router, registry, capsys):
    registry.set_aliases({"llama": Alias("llama", (("v3", 1),))})
    session = Session(router, SessionConfig())
    send(session, "/v1/chat/completions", {**CHAT, "model": "llama"})
    session.handle(frames.response_headers(200, end_of_stream=True))
    plain = Session(router, SessionConfig())
    send(plain, "/v1/chat/completions", CHAT)
    plain.handle(frames.response_headers(200, end_of_stream=True))
    lines = [line for line in capsys.readouterr().out.splitlines() if "request_finished" in line]
    assert "alias=llama" in lines[0] and "model=v3" in lines[0]
    assert "alias" not in lines[1]


# -- each API's end of stream -------------------------------------------------------------

# A streamed response of each API up to and including its end mark, as the engine writes
# it: (path, request, SSE bytes, prompt tokens, completion tokens).
_RESPONSES_USAGE = {"input_tokens": 7, "output_tokens": 2}
STREAMS = {
    "chat": (
        "/v1/chat/completions",
        {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
        b'data: {"choices":[{"index":0,"delta":{"content":"hey"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n",
        7,
        2,
    ),
    "responses": (
        "/v1/responses",
        {**RESPONSES, "stream": True},
        event("response.created", {"response": {"id": "r", "usage": None}})
        + b"\n\n"
        + event("response.output_text.delta", {"delta": "hey"})
        + b"\n\n"
        + event("response.completed", {"response": {"id": "r", "usage": _RESPONSES_USAGE}})
        + b"\n\n",
        7,
        2,
    ),
    "messages": (
        "/v1/messages",
        {**MESSAGES, "stream": True},
        event("message_start", {"message": {"usage": {"input_tokens": 7, "output_tokens": 1}}})
        + b"\n\n"
        + event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "x"}})
        + b"\n\n"
        + event("message_delta", {"delta": {}, "usage": {"output_tokens": 2}})
        + b"\n\n"
        + event("message_stop", {})
        + b"\n\n",
        7,
        2,
    ),
}


def counted() -> tuple[float, float]:
    return tokens("api", "api-0", "prompt"), tokens("api", "api-0", "completion")


@pytest.mark.parametrize("api", STREAMS)
def test_a_stream_cut_after_its_apis_end_mark_finished_and_is_counted(router, api):
    # Envoy may end the observer stream before the processor has read the last frame
    # (deferred_close_timeout): past the end mark the client had it all.
    path, request, stream, prompt, completion = STREAMS[api]
    session = Session(router, SessionConfig())
    send(session, path, request)
    before = counted()
    session.handle(sse_headers())
    session.handle(frames.response_body(stream))
    session.close(Outcome.CANCELLED)
    assert session.outcome is Outcome.FINISHED
    after = counted()
    assert (after[0] - before[0], after[1] - before[1]) == (prompt, completion)


@pytest.mark.parametrize("api", STREAMS)
def test_a_stream_cut_before_its_apis_end_mark_is_cut(router, api):
    path, request, stream, _, _ = STREAMS[api]
    session = Session(router, SessionConfig())
    send(session, path, request)
    before = counted()
    session.handle(sse_headers())
    # Everything but the end mark (the last event).
    session.handle(frames.response_body(stream[: stream.rstrip(b"\n").rindex(b"\n\n") + 2]))
    session.close(Outcome.CANCELLED)
    assert session.outcome is Outcome.CANCELLED
    assert counted() == before


@pytest.mark.parametrize("api", STREAMS)
def test_an_observer_in_another_process_reads_the_response_as_its_api_writes_it(router, api):
    # The routing answer names the API; a process that only sees the response (another
    # replica or worker) counts its tokens and knows its end mark from that.
    path, request, stream, prompt, completion = STREAMS[api]
    routing = Session(router, SessionConfig(), handoff_key="k-1")
    answer = send(routing, path, request)
    written = answer.dynamic_metadata.fields[HANDOFF_NAMESPACE].struct_value.fields
    context = {name: written[name].string_value for name in HANDOFF_CONTEXT_FIELDS}
    routing.hand_over()
    observer = Session.observing(router, SessionConfig(), context)
    before = counted()
    observer.handle(frames.response_body(stream))  # envoy.yaml skips the headers
    observer.close(Outcome.CANCELLED)
    assert observer.outcome is Outcome.FINISHED
    after = counted()
    assert (after[0] - before[0], after[1] - before[1]) == (prompt, completion)
