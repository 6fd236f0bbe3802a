"""The per-stream state machine fed frame sequences directly, in every body mode."""

from __future__ import annotations

import orjson
import pytest
from prometheus_client import REGISTRY

from gateway_extproc.apis import RoutedPaths
from gateway_extproc.extproc.session import Outcome, Session, SessionConfig
from gateway_extproc.models.aliases import Alias
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.catalog import StrategyCatalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.router import Router
from tests import frames
from tests.frames import Mode

CHAT = orjson.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
LLAMA_PODS = {"10.0.0.1:8000", "10.0.0.2:8000"}


@pytest.fixture
def registry() -> ModelRegistry:
    registry = ModelRegistry()
    registry.replace_all(
        [
            Pod("llama-0", "10.0.0.1:8000", ("llama",)),
            Pod("llama-1", "10.0.0.2:8000", ("llama",)),
            Pod("old-0", "10.0.0.3:8000", ("old",), terminating=True),
            Pod("cold-0", "10.0.0.4:8000", ("cold",), ready=False),
        ]
    )
    return registry


@pytest.fixture
def router(registry: ModelRegistry) -> Router:
    return Router(registry, StrategyCatalog(), "random", InFlightCounter(), retry_after=7)


def new_session(router: Router, **config: int) -> Session:
    return Session(router, SessionConfig(**config))


def requests_total(model: str, status: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_requests_total", {"model": model, "status": status, "code": code}
    )
    return value or 0.0


def only(responses: list) -> object:
    assert len(responses) == 1, responses
    return responses[0]


def error_of(response) -> tuple[int, dict]:
    assert response.WhichOneof("response") == "immediate_response"
    immediate = response.immediate_response
    return immediate.status.code, orjson.loads(immediate.body)["error"]


def start_buffered(session: Session, body: bytes = CHAT, **headers: str):
    assert only(session.handle(frames.request_headers(headers=headers))).HasField("request_headers")
    return only(session.handle(frames.request_body(body)))


# -- BUFFERED request body, STREAMED response body (the shipped Envoy config) -----------


def test_buffered_request_is_routed_with_headers_metadata_and_route_cache_cleared(router):
    session = new_session(router)
    routed = start_buffered(session)
    assert routed.WhichOneof("response") == "request_body"
    common = routed.request_body.response
    assert common.clear_route_cache
    headers = frames.set_headers(routed)
    assert headers["x-gateway-destination-endpoint"] in LLAMA_PODS
    assert headers["target-pod"] == headers["x-gateway-destination-endpoint"]
    assert len(headers["x-request-id"]) == 32  # generated because the client sent none
    metadata = routed.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert metadata["x-gateway-destination-endpoint"].string_value == headers["target-pod"]
    assert router.inflight.total() == 1


def test_client_request_id_is_kept_not_replaced(router):
    routed = start_buffered(new_session(router), **{"x-request-id": "abc-123"})
    assert "x-request-id" not in frames.set_headers(routed)


def test_response_end_of_stream_finishes_once_and_releases_in_flight(router):
    session = new_session(router)
    start_buffered(session)
    before = requests_total("llama", "200", "")
    assert only(session.handle(frames.response_headers(200))).HasField("response_headers")
    assert only(session.handle(frames.response_body(b'data: {"a":1}\n\n'))).HasField(
        "response_body"
    )
    assert router.inflight.total() == 1
    only(session.handle(frames.response_body(b"data: [DONE]\n\n", end_of_stream=True)))
    assert session.outcome is Outcome.FINISHED
    assert router.inflight.total() == 0
    assert requests_total("llama", "200", "") == before + 1


def test_duplicate_end_of_stream_and_body_after_it_are_acknowledged_and_ignored(router):
    session = new_session(router)
    start_buffered(session)
    session.handle(frames.response_headers(200))
    session.handle(frames.response_body(b"{}", end_of_stream=True))
    counted = requests_total("llama", "200", "")
    # The AIBrix defect: a second ResponseBody after EndOfStream parsed as empty JSON.
    for frame in (
        frames.response_body(b"", end_of_stream=True),
        frames.response_body(b"not json at all"),
        frames.response_headers(500),
        frames.response_trailers(),
    ):
        response = only(session.handle(frame))
        kind = response.WhichOneof("response")
        assert kind == frame.WhichOneof("request")
        assert getattr(response, kind).ByteSize() == 0  # empty CONTINUE
    assert session.outcome is Outcome.FINISHED
    assert requests_total("llama", "200", "") == counted
    assert router.inflight.total() == 0


def test_request_body_after_request_end_of_stream_is_not_parsed(router):
    session = new_session(router)
    start_buffered(session)
    response = only(session.handle(frames.request_body(b"{broken", end_of_stream=True)))
    assert response.WhichOneof("response") == "request_body"
    assert response.request_body.ByteSize() == 0
    assert session.outcome is None


def test_buffered_body_with_trailers_following_routes_then_acknowledges_trailers(router):
    session = new_session(router)
    session.handle(frames.request_headers())
    routed = only(session.handle(frames.request_body(CHAT, end_of_stream=False)))
    assert frames.set_headers(routed)["target-pod"] in LLAMA_PODS
    assert only(session.handle(frames.request_trailers())).HasField("request_trailers")
    assert only(session.handle(frames.request_trailers())).request_trailers.ByteSize() == 0


def test_response_trailers_finish_the_session(router):
    session = new_session(router)
    start_buffered(session)
    session.handle(frames.response_headers(200))
    session.handle(frames.response_body(b"{}"))
    only(session.handle(frames.response_trailers()))
    assert session.outcome is Outcome.FINISHED
    assert router.inflight.total() == 0


def test_header_only_response_finishes_the_session(router):
    session = new_session(router)
    start_buffered(session)
    session.handle(frames.response_headers(204, end_of_stream=True))
    assert session.outcome is Outcome.FINISHED


# -- cancelled and broken streams --------------------------------------------------------


def test_cancelled_stream_releases_in_flight_exactly_once(router):
    session = new_session(router)
    start_buffered(session)
    session.handle(frames.response_headers(200))
    before = requests_total("llama", "499", "client_cancelled")
    session.close()
    session.close()
    # A client that leaves mid-response is counted as a cancel (nginx's 499), not as
    # the 200 the engine had started.
    assert session.outcome is Outcome.CANCELLED
    assert router.inflight.total() == 0
    assert requests_total("llama", "499", "client_cancelled") == before + 1


def test_a_stream_that_breaks_is_aborted_not_cancelled(router):
    session = new_session(router)
    start_buffered(session)
    before = requests_total("llama", "0", "stream_aborted")
    session.close(Outcome.ABORTED)
    assert session.outcome is Outcome.ABORTED
    assert router.inflight.total() == 0
    assert requests_total("llama", "0", "stream_aborted") == before + 1


def test_frames_after_close_are_no_ops(router):
    session = new_session(router)
    start_buffered(session)
    session.close()
    response = only(session.handle(frames.response_headers(200)))
    assert response.response_headers.ByteSize() == 0
    assert router.inflight.total() == 0


# -- rejections ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 400, "invalid_request_body"),
        (b"{not json", 400, "invalid_request_body"),
        (b"[1, 2]", 400, "invalid_request_body"),
        (b'{"messages": []}', 400, "model_required"),
        (b'{"model": 7}', 400, "model_required"),
        (b'{"model": "nope"}', 404, "model_not_found"),
        (b'{"model": "old"}', 503, "model_terminating"),
        (b'{"model": "cold"}', 503, "no_ready_pods"),
    ],
)
def test_rejections_are_openai_errors(router, body, status, code):
    session = new_session(router)
    got_status, error = error_of(start_buffered(session, body))
    assert (got_status, error["code"]) == (status, code)
    assert set(error) == {"message", "type", "param", "code"}
    assert session.outcome is Outcome.REJECTED
    assert router.inflight.total() == 0
    # Envoy has answered the client; anything more it sends changes nothing.
    assert only(session.handle(frames.response_headers(200))).response_headers.ByteSize() == 0


def test_503_answers_carry_retry_after_and_json_content_type(router):
    response = start_buffered(new_session(router), b'{"model": "old"}')
    headers = frames.set_headers(response)
    assert headers["retry-after"] == "7"
    assert headers["content-type"] == "application/json"


def test_unknown_routing_strategy_is_400(router):
    response = start_buffered(new_session(router), **{"routing-strategy": "fastest-ever"})
    status, error = error_of(response)
    assert (status, error["code"]) == (400, "invalid_routing_strategy")
    assert "fastest-ever" in error["message"]


def test_a_huge_unknown_routing_strategy_is_not_echoed_back_whole(router):
    name = "x" * 8192
    response = start_buffered(new_session(router), **{"routing-strategy": name})
    status, error = error_of(response)
    assert (status, error["code"]) == (400, "invalid_routing_strategy")
    assert "xxxx" in error["message"]
    assert "8192 characters" in error["message"]
    assert len(error["message"]) < 1024


def test_a_huge_model_header_is_refused_without_being_echoed(router):
    config = frames.protocol(Mode.STREAMED, Mode.STREAMED)
    headers = {"x-gateway-model-name": "m" * 8192}
    response = only(
        new_session(router).handle(frames.request_headers(headers=headers, config=config))
    )
    status, error = error_of(response)
    assert (status, error["code"]) == (400, "model_required")
    assert len(error["message"]) < 1024


def test_a_number_beyond_a_double_is_valid_json_and_routed(router):
    body = b'{"model": "llama", "prompt": "hi", "max_tokens": 1e400}'
    routed = start_buffered(new_session(router), body)
    assert routed.WhichOneof("response") == "request_body"
    assert frames.set_headers(routed)["target-pod"] in LLAMA_PODS


@pytest.mark.parametrize("body", [b'{"model": "llama", "x": NaN}', b'{"model": "llama", "x": 1e'])
def test_what_is_not_json_stays_400(router, body):
    status, error = error_of(start_buffered(new_session(router), body))
    assert (status, error["code"]) == (400, "invalid_request_body")
    assert "not valid JSON" in error["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/admin/faults/reset"), ("GET", "/metrics"), ("POST", "/sleep?level=1")],
)
@pytest.mark.parametrize("mode", [Mode.STREAMED, Mode.BUFFERED, Mode.FULL_DUPLEX_STREAMED])
def test_engine_endpoints_are_404_even_when_a_model_is_named(router, registry, method, path, mode):
    config = frames.protocol(mode, Mode.STREAMED)
    headers = {"x-gateway-model-name": "llama"}
    session = new_session(router)
    response = only(
        session.handle(frames.request_headers(path, method, headers=headers, config=config))
    )
    status, error = error_of(response)
    assert (status, error["code"]) == (404, "unsupported_route")
    assert path.split("?")[0] in error["message"]
    assert session.outcome is Outcome.REJECTED
    assert all(router.inflight.count(pod.key) == 0 for pod in registry.lookup("llama").pods)


def test_allowed_paths_are_configurable_with_prefixes(router):
    config = SessionConfig(routed_paths=RoutedPaths(("/v1/audio/*",)))
    stream = frames.protocol(Mode.STREAMED, Mode.STREAMED)
    headers = {"x-gateway-model-name": "llama"}
    routed = only(
        Session(router, config).handle(
            frames.request_headers("/v1/audio/transcriptions", headers=headers, config=stream)
        )
    )
    assert frames.set_headers(routed)["target-pod"] in LLAMA_PODS
    refused = only(
        Session(router, config).handle(
            frames.request_headers("/v1/chat/completions", headers=headers, config=stream)
        )
    )
    assert error_of(refused)[1]["code"] == "unsupported_route"


def test_the_models_list_is_answered_whatever_paths_are_routed(router):
    config = SessionConfig(routed_paths=RoutedPaths(("/v1/chat/completions",)))
    answer = only(
        Session(router, config).handle(
            frames.request_headers("/v1/models", "GET", end_of_stream=True)
        )
    )
    assert answer.immediate_response.status.code == 200


@pytest.mark.parametrize("mode", [Mode.FULL_DUPLEX_STREAMED, Mode.STREAMED])
def test_declared_content_length_over_the_limit_is_413_at_headers(router, mode):
    session = new_session(router, max_body_bytes=100)
    config = frames.protocol(mode, Mode.STREAMED)
    first = frames.request_headers(headers={"content-length": "101"}, config=config)
    response = only(session.handle(first))
    assert error_of(response)[0] == 413


def test_buffered_body_over_the_limit_is_413_on_the_body_not_the_declared_length(router):
    # Envoy reads a buffered body while the headers are with us; refusing then would race
    # its own buffer-overflow 413 (tests/integration/test_errors.py shows both answers).
    session = new_session(router, max_body_bytes=100)
    headers = only(session.handle(frames.request_headers(headers={"content-length": "101"})))
    assert headers.HasField("request_headers")
    response = only(session.handle(frames.request_body(b"{" + b" " * 100)))
    assert error_of(response)[0] == 413


def test_header_only_post_without_model_is_400_model_required(router):
    response = only(new_session(router).handle(frames.request_headers(end_of_stream=True)))
    status, error = error_of(response)
    assert (status, error["code"]) == (400, "model_required")


def test_unknown_model_is_counted_under_a_bounded_label(router):
    before = requests_total("", "404", "model_not_found")
    start_buffered(new_session(router), b'{"model": "random-name-123"}')
    assert requests_total("", "404", "model_not_found") == before + 1


# -- GET /v1/models ------------------------------------------------------------------------


def test_models_list_is_answered_by_the_processor_with_ready_models_only(router):
    response = only(
        new_session(router).handle(frames.request_headers("/v1/models", "GET", end_of_stream=True))
    )
    assert response.immediate_response.status.code == 200
    listed = orjson.loads(response.immediate_response.body)
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["llama"]


def models_answer(router, path: str, method: str = "GET"):
    return only(
        new_session(router).handle(frames.request_headers(path, method, end_of_stream=True))
    )


def test_a_listed_model_is_retrieved_as_the_object_the_list_holds(router):
    listed = orjson.loads(models_answer(router, "/v1/models").immediate_response.body)
    response = models_answer(router, "/v1/models/llama")

    assert response.immediate_response.status.code == 200
    assert orjson.loads(response.immediate_response.body) == listed["data"][0]
    assert listed["data"][0] == {
        "id": "llama",
        "object": "model",
        "created": 0,
        "owned_by": "gateway-extproc",
    }


def test_an_id_with_a_slash_is_retrieved_sent_plain_or_percent_encoded(router, registry):
    registry.upsert_pod(Pod("org-0", "10.0.0.5:8000", ("org/model-7b",)))

    for path in ("/v1/models/org/model-7b", "/v1/models/org%2Fmodel-7b"):
        response = models_answer(router, path + "?x=1")
        assert orjson.loads(response.immediate_response.body)["id"] == "org/model-7b", path


def test_an_unknown_or_unlisted_model_is_a_404_in_openai_error_shape(router):
    # "cold" is known but has no ready pod, so the list leaves it out: not found either.
    for model in ("nope", "cold"):
        status, error = error_of(models_answer(router, f"/v1/models/{model}"))
        assert (status, error["code"], error["type"]) == (
            404,
            "model_not_found",
            "invalid_request_error",
        )
        assert f"`{model}`" in error["message"]


def test_head_of_models_is_answered_like_get(router):
    for path in ("/v1/models", "/v1/models/llama"):
        get = models_answer(router, path).immediate_response
        head = models_answer(router, path, "HEAD").immediate_response
        # The same answer: Envoy drops a local reply's body for a HEAD request
        # (tests/integration/test_routing.py shows it).
        assert (head.status.code, head.body) == (get.status.code, get.body), path
    status, _ = error_of(models_answer(router, "/v1/models/nope", "HEAD"))
    assert status == 404


def test_an_alias_is_retrieved_while_it_is_listed(router, registry):
    registry.set_aliases(
        {"chat": Alias("chat", (("llama", 1),)), "stuck": Alias("stuck", (("cold", 1),))}
    )
    listed = orjson.loads(models_answer(router, "/v1/models").immediate_response.body)

    assert [m["id"] for m in listed["data"]] == ["chat", "llama"]
    chat = models_answer(router, "/v1/models/chat").immediate_response
    assert orjson.loads(chat.body) == listed["data"][0]
    assert error_of(models_answer(router, "/v1/models/stuck"))[0] == 404


# -- FULL_DUPLEX_STREAMED ------------------------------------------------------------------


def full_duplex() -> frames.ext.ProtocolConfiguration:
    return frames.protocol(Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED)


def test_full_duplex_collects_chunks_then_answers_headers_and_streams_body_back(router):
    session = new_session(router)
    assert session.handle(frames.request_headers(config=full_duplex())) == []
    assert session.handle(frames.request_body(CHAT[:10], end_of_stream=False)) == []
    out = session.handle(frames.request_body(CHAT[10:], end_of_stream=True))
    assert out[0].WhichOneof("response") == "request_headers"
    assert out[0].request_headers.response.clear_route_cache
    assert frames.set_headers(out[0])["target-pod"] in LLAMA_PODS
    bodies = [r.request_body.response.body_mutation.streamed_response for r in out[1:]]
    assert b"".join(b.body for b in bodies) == CHAT
    assert [b.end_of_stream for b in bodies] == [False] * (len(bodies) - 1) + [True]
    # A duplicate final chunk (Envoy 1.35+ can send one) gets nothing back.
    assert session.handle(frames.request_body(b"", end_of_stream=True)) == []


def test_full_duplex_large_body_goes_back_in_chunks_under_64_kib(router):
    prompt = "x" * 200_000
    body = orjson.dumps({"model": "llama", "prompt": prompt})
    session = new_session(router)
    session.handle(frames.request_headers("/v1/completions", config=full_duplex()))
    out = session.handle(frames.request_body(body, end_of_stream=True))
    chunks = [r.request_body.response.body_mutation.streamed_response.body for r in out[1:]]
    assert len(chunks) > 1
    assert all(len(c) < 64 * 1024 for c in chunks)
    assert b"".join(chunks) == body


def test_full_duplex_response_chunks_are_passed_on_and_after_eos_ignored(router):
    session = new_session(router)
    session.handle(frames.request_headers(config=full_duplex()))
    session.handle(frames.request_body(CHAT, end_of_stream=True))
    assert only(session.handle(frames.response_headers(200))).HasField("response_headers")
    out = only(session.handle(frames.response_body(b"data: 1\n\n")))
    streamed = out.response_body.response.body_mutation.streamed_response
    assert (streamed.body, streamed.end_of_stream) == (b"data: 1\n\n", False)
    out = only(session.handle(frames.response_body(b"data: [DONE]\n\n", end_of_stream=True)))
    assert out.response_body.response.body_mutation.streamed_response.end_of_stream
    assert session.outcome is Outcome.FINISHED
    assert session.handle(frames.response_body(b"", end_of_stream=True)) == []


def test_full_duplex_rejection_is_immediate_after_the_body(router):
    session = new_session(router)
    session.handle(frames.request_headers(config=full_duplex()))
    status, error = error_of(only(session.handle(frames.request_body(b'{"model":"nope"}'))))
    assert (status, error["code"]) == (404, "model_not_found")


def test_full_duplex_body_over_the_limit_is_413_without_waiting_for_the_end(router):
    session = new_session(router, max_body_bytes=64)
    session.handle(frames.request_headers(config=full_duplex()))
    response = only(session.handle(frames.request_body(b"x" * 65, end_of_stream=False)))
    assert error_of(response)[0] == 413


# -- BUFFERED_PARTIAL, STREAMED and NONE request bodies -----------------------------------


def test_buffered_partial_prefix_that_cannot_be_parsed_is_413(router):
    session = new_session(router)
    session.handle(
        frames.request_headers(config=frames.protocol(Mode.BUFFERED_PARTIAL, Mode.STREAMED))
    )
    response = only(session.handle(frames.request_body(CHAT[:20], end_of_stream=False)))
    assert error_of(response)[0] == 413


def test_buffered_partial_complete_body_routes_and_later_chunks_pass(router):
    session = new_session(router)
    session.handle(
        frames.request_headers(config=frames.protocol(Mode.BUFFERED_PARTIAL, Mode.STREAMED))
    )
    routed = only(session.handle(frames.request_body(CHAT, end_of_stream=True)))
    assert frames.set_headers(routed)["target-pod"] in LLAMA_PODS


@pytest.mark.parametrize("mode", [Mode.STREAMED, Mode.NONE])
def test_modes_without_a_body_before_routing_use_the_model_header(router, mode):
    config = frames.protocol(mode, Mode.STREAMED)
    session = new_session(router)
    routed = only(
        session.handle(
            frames.request_headers(config=config, headers={"x-gateway-model-name": "llama"})
        )
    )
    assert routed.WhichOneof("response") == "request_headers"
    assert frames.set_headers(routed)["target-pod"] in LLAMA_PODS
    # The body streams past untouched.
    assert (
        only(session.handle(frames.request_body(CHAT, end_of_stream=True))).request_body.ByteSize()
        == 0
    )


def test_streamed_mode_without_the_model_header_explains_what_to_send(router):
    config = frames.protocol(Mode.STREAMED, Mode.STREAMED)
    status, error = error_of(
        only(new_session(router).handle(frames.request_headers(config=config)))
    )
    assert (status, error["code"]) == (400, "model_required")
    assert "x-gateway-model-name" in error["message"]


def test_response_body_mode_buffered_gets_one_continue(router):
    session = new_session(router)
    session.handle(frames.request_headers(config=frames.protocol(Mode.BUFFERED, Mode.BUFFERED)))
    session.handle(frames.request_body(CHAT))
    session.handle(frames.response_headers(200))
    only(session.handle(frames.response_body(b'{"usage": {}}', end_of_stream=True)))
    assert session.outcome is Outcome.FINISHED


# -- subset hint --------------------------------------------------------------------------


@pytest.mark.parametrize("subset", [["10.0.0.2:8000"], "10.0.0.9:1, 10.0.0.2:8000"])
def test_subset_hint_restricts_the_pick(router, subset):
    for _ in range(10):
        session = new_session(router)
        session.handle(frames.request_headers(subset=subset))
        routed = only(session.handle(frames.request_body(CHAT)))
        assert frames.set_headers(routed)["target-pod"] == "10.0.0.2:8000"
        session.close()


@pytest.mark.parametrize("subset", [[], "10.9.9.9:1"])
def test_empty_or_foreign_subset_is_503(router, subset):
    session = new_session(router)
    session.handle(frames.request_headers(subset=subset))
    status, error = error_of(only(session.handle(frames.request_body(CHAT))))
    assert (status, error["code"]) == (503, "no_ready_pods")


def test_fallback_endpoints_are_listed_equally_in_header_and_metadata(registry):
    router = Router(registry, StrategyCatalog(), "random", InFlightCounter(), fallback_endpoints=1)
    routed = start_buffered(new_session(router))
    headers = frames.set_headers(routed)
    listed = headers["x-gateway-destination-endpoint"].split(",")
    assert set(listed) == LLAMA_PODS
    assert headers["target-pod"] == listed[0]  # the pick alone
    metadata = routed.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert metadata["x-gateway-destination-endpoint"].string_value == ",".join(listed)


def test_access_log_line_can_be_switched_off(router, capsys):
    for access_log in (True, False):
        session = Session(router, SessionConfig(access_log=access_log))
        start_buffered(session)
        session.handle(frames.response_headers(200, end_of_stream=True))
        captured = capsys.readouterr()
        assert ("request_finished" in captured.out + captured.err) is access_log


def test_a_response_that_ends_after_its_pod_was_deleted_leaves_no_series_of_that_pod(
    router, registry
):
    session = new_session(router)
    routed = start_buffered(session)
    address = frames.set_headers(routed)["x-gateway-destination-endpoint"]
    pod_key = next(p.key for p in registry.pods() if p.address == address)
    session.handle(frames.response_headers(200))
    registry.delete_pod(pod_key)  # its series are forgotten here
    # Other tests' requests may have left series under this pod name in the process-wide
    # registry: what counts is that this response adds nothing to them.
    before = {kind: tokens_of(pod_key, kind) for kind in ("prompt", "completion")}
    usage = b'{"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
    session.handle(frames.response_body(usage, end_of_stream=True))
    assert session.outcome is Outcome.FINISHED
    assert {kind: tokens_of(pod_key, kind) for kind in ("prompt", "completion")} == before


def tokens_of(pod: str, kind: str) -> float | None:
    labels = {"model": "llama", "pod": pod, "kind": kind}
    return REGISTRY.get_sample_value("gateway_tokens_total", labels)
