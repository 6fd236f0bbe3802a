"""The errors the processor refuses a request with: one class carrying status and code.

Shared by routing (no such model, no ready pod, unknown strategy) and the request
parsing in openai/ (bad body, no model), so it sits at the bottom of the tree and knows
nothing of any wire format. extproc/ turns a `GatewayError` into an ImmediateResponse
whose body is OpenAI's error shape (openai/errors.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GatewayError(Exception):
    status: int
    code: str
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    retry_after: int | None = None


def invalid_body(message: str) -> GatewayError:
    return GatewayError(400, "invalid_request_body", message)


def model_required(message: str = "the request body must name a model") -> GatewayError:
    return GatewayError(400, "model_required", message, param="model")


def invalid_routing_strategy(name: str, known: list[str]) -> GatewayError:
    return GatewayError(
        400,
        "invalid_routing_strategy",
        f"unknown routing strategy {name!r}; known: {', '.join(known)}",
        param="routing-strategy",
    )


def request_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, "request_too_large", f"request body exceeds the limit of {limit} bytes"
    )


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        "model_not_found",
        f"The model `{model}` does not exist.",
        param="model",
    )


def model_terminating(model: str, retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        "model_terminating",
        f"The model `{model}` is being deleted and takes no new requests.",
        type="service_unavailable",
        param="model",
        retry_after=retry_after,
    )


def no_ready_pods(model: str, retry_after: int, detail: str = "") -> GatewayError:
    return GatewayError(
        503,
        "no_ready_pods",
        f"The model `{model}` has no ready pod{detail}; retry later.",
        type="service_unavailable",
        param="model",
        retry_after=retry_after,
    )


def unsupported_route(method: str, path: str) -> GatewayError:
    return GatewayError(
        404, "unknown_route", f"{method} {path} is not an inference endpoint of this gateway"
    )
