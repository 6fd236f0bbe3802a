"""The endpoint-picker protocol as a session sees it (Gateway API Inference Extension,
proposal 004): subset hints naming endpoints or bare pod IPs, FULL_DUPLEX_STREAMED with
trailers, and the conformance suite's selection and echo headers."""

from __future__ import annotations

import orjson
import pytest
from google.protobuf import struct_pb2

from gateway_extproc.extproc.session import Outcome, Session, SessionConfig
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.catalog import StrategyCatalog
from gateway_extproc.routing.filters import in_subset
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.router import Router
from tests import frames
from tests.frames import Mode

CHAT = orjson.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
SELECTION = "test-epp-endpoint-selection"
ECHO = "x-conformance-test-served-endpoint"


@pytest.fixture
def router() -> Router:
    registry = ModelRegistry()
    # Two data-parallel ranks on one pod, one rank on another.
    registry.replace_all(
        [
            Pod("a-rank-0", "10.0.0.1:8000", ("llama",)),
            Pod("a-rank-1", "10.0.0.1:8001", ("llama",)),
            Pod("b-rank-0", "10.0.0.2:8000", ("llama",)),
        ]
    )
    return Router(registry, StrategyCatalog(), "random", InFlightCounter())


def picks(router: Router, *, times: int = 30, conformance: bool = False, **request) -> set[str]:
    """Where `times` full-duplex requests go (the error code when one is refused)."""
    seen = set()
    for _ in range(times):
        session = Session(router, SessionConfig(conformance_mode=conformance))
        duplex = frames.protocol(Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED)
        assert session.handle(frames.request_headers(config=duplex, **request)) == []
        answers = session.handle(frames.request_body(CHAT, end_of_stream=True))
        first = answers[0]
        if first.HasField("immediate_response"):
            error = orjson.loads(first.immediate_response.body)["error"]
            seen.add(f"{first.immediate_response.status.code} {error['code']}")
        else:
            seen.add(frames.set_headers(first)["x-gateway-destination-endpoint"])
        session.close()
    return seen


def test_a_bare_pod_ip_in_the_subset_means_every_rank_of_that_pod(router):
    assert picks(router, subset=["10.0.0.1"]) == {"10.0.0.1:8000", "10.0.0.1:8001"}
    assert picks(router, subset="10.0.0.1:8001") == {"10.0.0.1:8001"}


def test_a_subset_list_entry_may_itself_be_comma_separated(router):
    assert picks(router, subset=["10.0.0.2:8000, 10.0.0.1:8001"]) == {
        "10.0.0.2:8000",
        "10.0.0.1:8001",
    }


def test_nothing_eligible_in_the_subset_is_503(router):
    assert picks(router, times=1, subset=["10.9.9.9"]) == {"503 no_ready_pods"}
    assert picks(router, times=1, subset=[]) == {"503 no_ready_pods"}


def test_in_subset_compares_hosts_of_ipv6_endpoints():
    assert in_subset("[fd00::1]:8000", frozenset({"fd00::1"}))
    assert in_subset("[fd00::1]:8000", frozenset({"[fd00::1]:8000"}))
    assert not in_subset("[fd00::1]:8000", frozenset({"fd00::2"}))


def test_conformance_selection_header_steers_the_pick_and_wins_over_the_hint(router):
    headers = {SELECTION: "10.0.0.2"}
    assert picks(router, conformance=True, headers=headers) == {"10.0.0.2:8000"}
    assert picks(router, conformance=True, headers=headers, subset=["10.0.0.1"]) == {
        "10.0.0.2:8000"
    }
    assert picks(router, conformance=True, headers={SELECTION: "10.0.0.1:8001,10.0.0.2:8000"}) == {
        "10.0.0.1:8001",
        "10.0.0.2:8000",
    }
    assert picks(router, times=1, conformance=True, headers={SELECTION: "10.7.7.7"}) == {
        "503 no_ready_pods"
    }


def test_without_conformance_mode_the_selection_header_is_ignored(router):
    assert picks(router, headers={SELECTION: "10.0.0.2"}) == {
        "10.0.0.1:8000",
        "10.0.0.1:8001",
        "10.0.0.2:8000",
    }


def served_headers(served: str | None) -> frames.ext.ProcessingRequest:
    frame = frames.response_headers(200)
    if served is not None:
        lb = struct_pb2.Struct()
        lb["x-gateway-destination-endpoint-served"] = served
        frame.metadata_context.filter_metadata["envoy.lb"].CopyFrom(lb)
    return frame


@pytest.mark.parametrize(
    ("served", "echo"),
    [
        ("10.0.0.2:8000", "10.0.0.2:8000"),
        (None, "fail: missing destination endpoint served metadata"),
    ],
)
def test_conformance_mode_echoes_the_served_endpoint(router, served, echo):
    session = Session(router, SessionConfig(conformance_mode=True))
    duplex = frames.protocol(Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED)
    session.handle(frames.request_headers(config=duplex, headers={SELECTION: "10.0.0.2"}))
    session.handle(frames.request_body(CHAT, end_of_stream=True))
    (answer,) = session.handle(served_headers(served))
    assert answer.WhichOneof("response") == "response_headers"
    assert frames.set_headers(answer) == {ECHO: echo}


def test_without_conformance_mode_response_headers_are_left_alone(router):
    session = Session(router, SessionConfig())
    session.handle(frames.request_headers())
    session.handle(frames.request_body(CHAT))
    (answer,) = session.handle(served_headers("10.0.0.2:8000"))
    assert frames.set_headers(answer) == {}


def test_full_duplex_with_trailers_both_ways_is_answered(router):
    """Envoy AI Gateway's picker filter sends every phase, trailers included."""
    session = Session(router, SessionConfig())
    duplex = frames.protocol(Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED)
    assert session.handle(frames.request_headers(config=duplex)) == []
    assert session.handle(frames.request_body(CHAT[:10], end_of_stream=False)) == []
    assert session.handle(frames.request_body(CHAT[10:], end_of_stream=False)) == []
    routed = session.handle(frames.request_trailers())
    kinds = [a.WhichOneof("response") for a in routed]
    assert kinds == ["request_headers", "request_body", "request_trailers"]
    body = routed[1].request_body.response.body_mutation.streamed_response
    assert body.body == CHAT and not body.end_of_stream  # the trailers end the request
    assert session.handle(served_headers("10.0.0.1:8000"))[0].HasField("response_headers")
    echoed = session.handle(frames.response_body(b'{"usage": {}}'))
    assert echoed[0].response_body.response.body_mutation.streamed_response.body == b'{"usage": {}}'
    (last,) = session.handle(frames.response_trailers())
    assert last.WhichOneof("response") == "response_trailers"
    assert session.outcome is Outcome.FINISHED
