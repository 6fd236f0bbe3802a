"""Random frame sequences in every body mode: the session never raises, answers every
frame with responses of the frame's own kind (or an immediate response, or nothing in
FULL_DUPLEX_STREAMED), and always returns its in-flight count to zero."""

from __future__ import annotations

import random

import pytest

from gateway_extproc.extproc.session import Session, SessionConfig
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.catalog import StrategyCatalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.router import Router
from tests import frames
from tests.frames import Mode

MODES = [Mode.NONE, Mode.STREAMED, Mode.BUFFERED, Mode.BUFFERED_PARTIAL, Mode.FULL_DUPLEX_STREAMED]
BODIES = [
    b"",
    b"{",
    b"null",
    b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "gone"}',
    b'{"model": 5}',
    b"\xff\xfe garbage",
    b'data: {"usage": {"prompt_tokens": 1}}\n\ndata: [DONE]\n\n',
    b'data: {"choices":[{"delta":{"content":"x"}}]}\r\n\r',
]


def random_frame(rng: random.Random) -> frames.ext.ProcessingRequest:
    kind = rng.randrange(6)
    eos = rng.random() < 0.4
    if kind == 0:
        headers = {}
        if rng.random() < 0.5:
            headers["x-gateway-model-name"] = rng.choice(["m", "gone", ""])
        if rng.random() < 0.2:
            headers["routing-strategy"] = rng.choice(["random", "nope", "round-robin"])
        if rng.random() < 0.1:
            headers["content-length"] = rng.choice(["12", "999999999999", "x"])
        path = rng.choice(["/v1/chat/completions", "/v1/models", "/other", ""])
        config = frames.protocol(rng.choice(MODES), rng.choice(MODES))
        subset = rng.choice([None, [], ["10.0.0.1:8000"], "10.0.0.1:8000,bad"])
        return frames.request_headers(
            path,
            rng.choice(["GET", "POST"]),
            end_of_stream=eos,
            headers=headers,
            config=config,
            subset=subset,
        )
    if kind == 1:
        return frames.request_body(rng.choice(BODIES), end_of_stream=eos)
    if kind == 2:
        return frames.request_trailers()
    if kind == 3:
        return frames.response_headers(rng.choice([200, 400, 500, 0]), end_of_stream=eos)
    if kind == 4:
        return frames.response_body(rng.choice(BODIES), end_of_stream=eos)
    return frames.response_trailers()


@pytest.mark.parametrize("seed", range(20))
def test_random_frame_sequences_never_break_the_session(seed):
    rng = random.Random(seed)
    registry = ModelRegistry()
    registry.replace_all([Pod("p0", "10.0.0.1:8000", ("m",)), Pod("p1", "10.0.0.2:8000", ("m",))])
    inflight = InFlightCounter()
    router = Router(registry, StrategyCatalog(), "random", inflight, fallback_endpoints=1)
    seen: set[str] = set()
    for _ in range(50):
        session = Session(router, SessionConfig(max_body_bytes=64, inject_include_usage=True))
        for _ in range(rng.randrange(1, 12)):
            frame = random_frame(rng)
            kind = frame.WhichOneof("request")
            for answer in session.handle(frame):
                got = answer.WhichOneof("response")
                # Answers match their frame; the routed FULL_DUPLEX body answers with the
                # request headers response first; an immediate response may end anything.
                allowed = {kind, "immediate_response"}
                if kind in ("request_body", "request_trailers"):
                    allowed |= {"request_headers", "request_body"}
                assert got in allowed, (kind, got)
                assert isinstance(answer.SerializeToString(), bytes)  # Envoy can read it
                seen.add("rejected" if got == "immediate_response" else "answered")
        session.close()
        assert inflight.total() == 0
    assert seen == {"rejected", "answered"}  # the sequences reach both outcomes
