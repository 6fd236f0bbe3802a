"""Requests through a real Envoy reach the model's pods: plain, streamed, large, and
spread across pods by the routing strategy; `GET /v1/models` is the processor's answer.

The main flows run against both shipped Envoy bootstraps (`any_gateway`): request body
BUFFERED with a STREAMED response, and FULL_DUPLEX_STREAMED both ways.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise

from tests.integration.stack import (
    CHAT_MODEL,
    LIFECYCLE_MODEL,
    SOLO_MODEL,
    Gateway,
    Pod,
    Response,
    chat,
    http_request,
    model_addresses,
    post_json,
)

MAX_TOKENS = 12


def served_by(response: Response) -> str:
    """The pod that answered, as the simulator names itself (header and reply text)."""
    pod = response.headers["x-simulator-pod"]
    port = pod.rpartition(":")[2]
    content = response.json()["choices"][0]["message"]["content"]
    assert content.startswith(f"sim-{port}:"), (pod, content)
    return pod


def test_chat_completion_is_routed_to_one_of_the_models_pods(
    any_gateway: Gateway, pods: dict[str, Pod]
) -> None:
    response = chat(any_gateway.port, CHAT_MODEL, max_tokens=MAX_TOKENS)

    assert response.status == 200, response.body
    assert served_by(response) in model_addresses(pods, CHAT_MODEL)
    body = response.json()
    assert body["model"] == CHAT_MODEL
    assert body["usage"]["completion_tokens"] == MAX_TOKENS


def test_a_model_with_one_pod_always_gets_that_pod(
    any_gateway: Gateway, pods: dict[str, Pod]
) -> None:
    seen = {served_by(chat(any_gateway.port, SOLO_MODEL)) for _ in range(5)}

    assert seen == model_addresses(pods, SOLO_MODEL)


def test_a_client_cannot_choose_the_pod_with_the_destination_header(
    any_gateway: Gateway, pods: dict[str, Pod]
) -> None:
    # The solo model's pod does not serve chat-model; the processor's pick must win.
    (elsewhere,) = model_addresses(pods, SOLO_MODEL)
    spoofed = {"x-gateway-destination-endpoint": elsewhere, "target-pod": elsewhere}

    response = chat(any_gateway.port, CHAT_MODEL, spoofed)

    assert response.status == 200, response.body
    assert served_by(response) in model_addresses(pods, CHAT_MODEL)


def test_unknown_model_is_404_with_an_openai_error(any_gateway: Gateway) -> None:
    response = chat(any_gateway.port, "no-such-model")

    assert response.status == 404
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "no-such-model" in error["message"]
    assert "x-simulator-pod" not in response.headers


def test_stream_arrives_intact(any_gateway: Gateway, pods: dict[str, Pod]) -> None:
    response = chat(any_gateway.port, CHAT_MODEL, stream=True, max_tokens=MAX_TOKENS)

    assert response.status == 200, response.body
    assert response.headers["content-type"].startswith("text/event-stream")
    pod = response.headers["x-simulator-pod"]
    assert pod in model_addresses(pods, CHAT_MODEL)
    events = [e for e in response.body.decode().split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}  # one completion, nothing mixed in
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert sum(1 for d in deltas if d) == MAX_TOKENS  # every token, none lost or repeated
    assert "".join(deltas).startswith(f"sim-{pod.rpartition(':')[2]}:")
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_random_routing_uses_both_pods(gateway: Gateway, pods: dict[str, Pod]) -> None:
    header = {"routing-strategy": "random"}
    seen = Counter(
        served_by(chat(gateway.port, CHAT_MODEL, header, max_tokens=1)) for _ in range(20)
    )

    # Both pods get traffic (a random pick misses one 20 times in a row with p = 2e-6).
    assert set(seen) == model_addresses(pods, CHAT_MODEL), seen


def test_round_robin_alternates_strictly(gateway: Gateway, pods: dict[str, Pod]) -> None:
    header = {"routing-strategy": "round-robin"}
    order = [served_by(chat(gateway.port, CHAT_MODEL, header, max_tokens=1)) for _ in range(20)]

    assert set(order) == model_addresses(pods, CHAT_MODEL)
    assert all(a != b for a, b in pairwise(order)), order


def test_round_robin_covers_a_model_whose_pods_serve_other_models_too(
    gateway: Gateway, pods: dict[str, Pod]
) -> None:
    header = {"routing-strategy": "round-robin"}
    order = [served_by(chat(gateway.port, LIFECYCLE_MODEL, header)) for _ in range(4)]

    assert set(order) == model_addresses(pods, LIFECYCLE_MODEL)
    assert order[0::2] == [order[0]] * 2 and order[1::2] == [order[1]] * 2, order


def test_models_list_through_envoy_names_the_ready_models(gateway: Gateway) -> None:
    response = http_request(gateway.port, "GET", "/v1/models")

    assert response.status == 200
    body = response.json()
    assert body["object"] == "list"
    # The not-ready model is known to the processor but has no pod to serve it.
    assert sorted(m["id"] for m in body["data"]) == sorted(
        [CHAT_MODEL, SOLO_MODEL, LIFECYCLE_MODEL]
    )
    assert "x-simulator-pod" not in response.headers


def test_a_model_is_retrieved_through_envoy_as_the_list_shows_it(any_gateway: Gateway) -> None:
    listed = http_request(any_gateway.port, "GET", "/v1/models").json()["data"]
    response = http_request(any_gateway.port, "GET", f"/v1/models/{CHAT_MODEL}")

    assert response.status == 200, response.body
    assert response.json() == next(m for m in listed if m["id"] == CHAT_MODEL)
    assert "x-simulator-pod" not in response.headers


def test_an_unknown_model_is_a_404_model_not_found_through_envoy(gateway: Gateway) -> None:
    response = http_request(gateway.port, "GET", "/v1/models/no-such-model")

    assert response.status == 404
    assert response.error_code() == "model_not_found"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_head_of_the_models_endpoints_is_get_without_the_body(any_gateway: Gateway) -> None:
    for path in ("/v1/models", f"/v1/models/{CHAT_MODEL}"):
        get = http_request(any_gateway.port, "GET", path)
        head = http_request(any_gateway.port, "HEAD", path)

        assert get.body and get.status == 200, path
        assert (head.status, head.body) == (200, b""), path
        assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
    assert http_request(any_gateway.port, "HEAD", "/v1/models/no-such-model").status == 404


def test_a_3_mib_prompt_is_routed(any_gateway: Gateway, pods: dict[str, Pod]) -> None:
    word = "x" * 1023  # the simulator counts one token per word
    prompt = " ".join([word] * 3 * 1024)
    doc = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": prompt}]}
    body = json.dumps(doc).encode()
    assert len(body) > 3 * 1024 * 1024

    response = post_json(any_gateway.port, "/v1/chat/completions", doc)

    assert response.status == 200, response.body[:500]
    assert served_by(response) in model_addresses(pods, CHAT_MODEL)
    # The engine saw every word of the prompt.
    assert response.json()["usage"]["prompt_tokens"] >= 3 * 1024
