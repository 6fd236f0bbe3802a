"""The gateway's public face against what a hostile or careless client sends, through
the real Envoy with the shipped envoy/envoy.yaml: an engine's other endpoints are out of
reach whatever model a request names, a number JSON allows is not "invalid JSON", and
clients that never finish their headers are closed while others are served."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.integration.stack import (
    CHAT_MODEL,
    LOCALHOST,
    Gateway,
    Pod,
    http_request,
    model_addresses,
    post_json,
)
from tests.integration.test_errors import JSON, assert_openai_error

MODEL_HEADER = "x-gateway-model-name"
# Stalled connections held open at once: enough to show others are still served, far
# below the listener's connection cap (the 10,000-connection run is in the chaos bench).
STALLED = 50


def chat_pods(pods: dict[str, Pod]) -> list[Pod]:
    addresses = model_addresses(pods, CHAT_MODEL)
    return [pod for pod in pods.values() if pod.address in addresses]


def faults_of(pod: Pod) -> dict[str, object]:
    response = http_request(pod.port, "GET", "/admin/faults")  # the engine itself
    assert response.status == 200
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture
def marked_engines(pods: dict[str, Pod]) -> Iterator[list[Pod]]:
    """The chat model's engines with a fault setting that only their reset clears (a
    slow factor too small to matter), cleared at the end."""
    engines = chat_pods(pods)
    for pod in engines:
        assert post_json(pod.port, "/admin/faults", {"slow_factor": 1.001}).status == 200
    yield engines
    for pod in engines:
        assert http_request(pod.port, "POST", "/admin/faults/reset", b"").status == 200


def test_engine_endpoints_are_404_through_the_gateway_whatever_model_is_named(
    gateway: Gateway, marked_engines: list[Pod]
) -> None:
    named = {MODEL_HEADER: CHAT_MODEL, **JSON}
    body = b'{"model": "%s"}' % CHAT_MODEL.encode()
    attempts = [
        ("POST", "/admin/faults/reset", body),  # the model in the body too
        ("POST", "/admin/faults/reset", None),
        ("GET", "/metrics", None),
        ("POST", "/reset_prefix_cache?x=1", body),
    ]
    for method, path, payload in attempts:
        response = http_request(gateway.port, method, path, payload, named)
        error = assert_openai_error(response, 404, "unsupported_route")  # no engine answered
        assert path.split("?")[0] in error["message"]
    # The engines never saw the reset: their setting is still there.
    for pod in marked_engines:
        assert faults_of(pod)["slow_factor"] == 1.001
    # The inference paths are routed as before.
    routed = post_json(
        gateway.port,
        "/v1/chat/completions",
        {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert routed.status == 200
    assert routed.headers["x-simulator-pod"] in {pod.address for pod in marked_engines}


def test_a_number_beyond_a_double_reaches_the_engine_which_names_the_field(
    gateway: Gateway,
) -> None:
    body = (
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}'
        % CHAT_MODEL.encode()
    )
    response = http_request(gateway.port, "POST", "/v1/chat/completions", body, JSON)
    assert response.status == 400, response.body
    assert "x-simulator-pod" in response.headers  # routed: the gateway found it valid JSON
    error = response.json()["error"]
    assert error["param"] == "max_tokens", error
    assert "JSON" not in error["message"]


def test_the_whole_unknown_strategy_is_not_echoed_back(gateway: Gateway) -> None:
    response = post_json(
        gateway.port,
        "/v1/chat/completions",
        {"model": CHAT_MODEL, "messages": []},
        {"routing-strategy": "z" * 8000},
    )
    error = assert_openai_error(response, 400, "invalid_routing_strategy")
    assert len(response.body) < 1024
    assert "8000 characters" in error["message"]


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the
    socket's timeout: a connection Envoy never closes fails the test)."""
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_clients_that_never_finish_their_headers_are_closed_and_others_served(
    gateway: Gateway,
) -> None:
    stalled = []
    try:
        for _ in range(STALLED):
            sock = socket.create_connection((LOCALHOST, gateway.port), timeout=60)
            # A request line and one header, then nothing: the blank line never comes.
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n")
            stalled.append(sock)
        # Meanwhile a client that sends its request whole is served.
        served = post_json(
            gateway.port,
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert served.status == 200, served.body
        # Envoy closes every stalled connection once its headers timeout passes (with a
        # 408 where it still answers); a socket Envoy left open would time out here.
        for sock in stalled:
            answer = read_until_closed(sock)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]
    finally:
        for sock in stalled:
            sock.close()
