"""What a client sees when a request cannot be served: OpenAI error bodies with the
right status, from the processor (bad body, unknown model or strategy, a model that is
terminating or has no ready pod, a body over the limit) or from Envoy (a body over its
buffer, no processor at all), while engine errors pass through untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway_extproc.config import Settings
from gateway_extproc.devtools import localstack
from tests.integration.stack import (
    CHAT_MODEL,
    LIFECYCLE_MODEL,
    UNREADY_MODEL,
    Gateway,
    ModelsFile,
    Pod,
    Processor,
    Response,
    chat,
    http_request,
    model_addresses,
    poll,
    post_json,
    running_gateway,
)

CHAT_PATH = "/v1/chat/completions"
JSON = {"content-type": "application/json"}
LIMIT = Settings().max_body_bytes  # the processor's default --max-body-bytes


def assert_openai_error(response: Response, status: int, code: str = "") -> dict[str, Any]:
    """The response is an OpenAI error with `status` (and `code`, when given)."""
    assert response.status == status, (response.status, response.body[:300])
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    if code:
        assert error["code"] == code, error
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert "x-simulator-pod" not in response.headers  # no pod was involved
    return error  # type: ignore[no-any-return]


def test_body_that_is_not_json_is_400(gateway: Gateway) -> None:
    response = http_request(gateway.port, "POST", CHAT_PATH, b"{not json", JSON)

    error = assert_openai_error(response, 400, "invalid_request_body")
    assert "JSON" in error["message"]


def test_body_without_a_model_is_400(gateway: Gateway) -> None:
    response = post_json(gateway.port, CHAT_PATH, {"messages": []})

    error = assert_openai_error(response, 400, "model_required")
    assert error["param"] == "model"


def test_unknown_routing_strategy_is_400(gateway: Gateway) -> None:
    response = chat(gateway.port, CHAT_MODEL, {"routing-strategy": "no-such-strategy"})

    error = assert_openai_error(response, 400, "invalid_routing_strategy")
    assert "no-such-strategy" in error["message"]


def test_model_without_a_ready_pod_is_503_with_retry_after(gateway: Gateway) -> None:
    response = chat(gateway.port, UNREADY_MODEL)

    assert_openai_error(response, 503, "no_ready_pods")
    assert int(response.headers["retry-after"]) > 0


def test_model_follows_the_models_file_terminating_deleted_restored(
    gateway: Gateway, models_file: ModelsFile, pods: dict[str, Pod]
) -> None:
    def ask() -> Response:
        return chat(gateway.port, LIFECYCLE_MODEL)

    assert ask().status == 200
    doc = models_file.load()
    (model,) = [m for m in doc["models"] if m["name"] == LIFECYCLE_MODEL]

    # Every pod of the model is being deleted: no new requests, come back later.
    for pod in model["pods"]:
        pod["state"] = "terminating"
    models_file.write(doc)
    response = poll("the model is terminating", ask, lambda r: r.status != 200)
    assert_openai_error(response, 503, "model_terminating")
    assert int(response.headers["retry-after"]) > 0

    # The model is gone from the dictionary.
    doc["models"].remove(model)
    models_file.write(doc)
    response = poll("the model is deleted", ask, lambda r: r.status != 503)
    assert_openai_error(response, 404, "model_not_found")

    # And back.
    models_file.restore()
    response = poll("the model is back", ask, lambda r: r.status != 404)
    assert response.status == 200
    assert response.headers["x-simulator-pod"] in model_addresses(pods, LIFECYCLE_MODEL)


def test_models_list_follows_the_models_file(gateway: Gateway, models_file: ModelsFile) -> None:
    doc = models_file.load()
    doc["models"] = [m for m in doc["models"] if m["name"] != LIFECYCLE_MODEL]
    models_file.write(doc)

    def listed() -> set[str]:
        return {m["id"] for m in http_request(gateway.port, "GET", "/v1/models").json()["data"]}

    remaining = poll(
        "the deleted model leaves /v1/models", listed, lambda ids: LIFECYCLE_MODEL not in ids
    )
    assert CHAT_MODEL in remaining


def oversized_chat_body() -> bytes:
    prefix = b'{"model": "' + CHAT_MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
    suffix = b'"}]}'
    return prefix + b"x" * (LIMIT + 1024 - len(prefix) - len(suffix)) + suffix


def in_pieces(body: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


PROCESSOR_413 = f"limit of {LIMIT} bytes"  # the processor's wording
ENVOY_413 = "buffer limit"  # Envoy's local reply, shaped by local_reply_config


def test_body_over_the_limit_with_content_length_is_413(any_gateway: Gateway) -> None:
    response = http_request(any_gateway.port, "POST", CHAT_PATH, oversized_chat_body(), JSON)

    error = assert_openai_error(response, 413, "request_too_large")
    if any_gateway.config == "envoy.yaml":
        # BUFFERED: the processor refuses on the Content-Length header while Envoy
        # buffers the arriving body; if the upload outruns the processor, Envoy's
        # buffer (the same 8 MiB) overflows first. Either way the same OpenAI error.
        assert PROCESSOR_413 in error["message"] or ENVOY_413 in error["message"]
    else:
        # FULL_DUPLEX_STREAMED: nothing is buffered by Envoy; the processor answers.
        assert PROCESSOR_413 in error["message"]


def test_chunked_body_over_the_limit_is_413(any_gateway: Gateway) -> None:
    response = http_request(
        any_gateway.port, "POST", CHAT_PATH, in_pieces(oversized_chat_body()), JSON
    )

    error = assert_openai_error(response, 413, "request_too_large")
    if any_gateway.config == "envoy.yaml":
        # BUFFERED without Content-Length: Envoy's buffer fills before the processor
        # sees any of the body.
        assert ENVOY_413 in error["message"]
    else:
        # FULL_DUPLEX_STREAMED: Envoy streams the chunks; the processor counts them.
        assert PROCESSOR_413 in error["message"]


def test_engine_errors_pass_through_untouched(gateway: Gateway, pods: dict[str, Pod]) -> None:
    response = chat(gateway.port, CHAT_MODEL, max_tokens=10**9)

    # The simulator's own 400 (like vLLM's), not something Envoy or the processor made.
    assert response.status == 400
    assert response.headers["x-simulator-pod"] in model_addresses(pods, CHAT_MODEL)
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_a_pod_that_refuses_connections_is_a_503_from_envoy(
    gateway: Gateway, models_file: ModelsFile, processor: Processor
) -> None:
    doc = models_file.load()
    address = f"127.0.0.1:{localstack.free_port()}"  # nothing listens here
    doc["models"].append(
        {"name": "unreachable-model", "pods": [{"name": "gone", "address": address}]}
    )
    models_file.write(doc)

    response = poll(
        "the new model is known",
        lambda: chat(gateway.port, "unreachable-model"),
        lambda r: r.status != 404,
    )

    # Envoy's own answer (the processor routed it), in the OpenAI shape.
    error = assert_openai_error(response, 503)
    assert error["code"].startswith("upstream_reset_before_response_started")
    assert error["type"] == "gateway_error"
    # The processor saw the request end, so the pod is not left with a request in flight.
    pods = poll(
        "the failed request is released",
        lambda: processor.get("/debug/models").json()["models"]["unreachable-model"]["pods"],
        lambda seen: seen[0]["in_flight"] == 0,
    )
    assert pods[0]["address"] == address


@pytest.fixture
def gateway_without_processor(log_dir: Path) -> Iterator[Gateway]:
    """Envoy whose processor address has nothing listening."""
    nowhere = localstack.free_port()
    with running_gateway(localstack.ENVOY_CONFIG, nowhere, log_dir, "envoy-no-processor") as gw:
        yield gw


def test_without_the_processor_requests_fail_closed(gateway_without_processor: Gateway) -> None:
    response = chat(gateway_without_processor.port, CHAT_MODEL)

    # Never sent to a default destination: a retryable 503 in the OpenAI shape.
    error = assert_openai_error(response, 503, "processor_unavailable")
    assert error["type"] == "service_unavailable"
