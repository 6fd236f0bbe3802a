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
    headers: tuple[tuple[str, str], ...] = ()  # more response headers (x-ratelimit-*)


def invalid_body(message: str) -> GatewayError:
    return GatewayError(400, "invalid_request_body", message)


def model_required(message: str = "the request body must name a model") -> GatewayError:
    return GatewayError(400, "model_required", message, param="model")


# The most of a client's value an error message quotes back: enough to recognise it, not
# an 8 KiB header echoed into every log line and answer.
QUOTE_LIMIT = 64


def quoted(value: str) -> str:
    """`value` for an error message: repr'd, cut to QUOTE_LIMIT characters."""
    if len(value) <= QUOTE_LIMIT:
        return repr(value)
    return f"{value[:QUOTE_LIMIT]!r}... ({len(value)} characters)"


def invalid_routing_strategy(name: str, known: list[str]) -> GatewayError:
    return GatewayError(
        400,
        "invalid_routing_strategy",
        f"unknown routing strategy {quoted(name)}; known: {', '.join(known)}",
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
        404,
        "unsupported_route",
        f"{method[:QUOTE_LIMIT]} {quoted(path)} is not an inference endpoint of this gateway",
    )


def header_not_allowed(header: str) -> GatewayError:
    return GatewayError(
        400,
        "header_not_allowed",
        f"clients may not set the {header} header on this gateway",
        param=header,
    )


def invalid_priority(value: str) -> GatewayError:
    return GatewayError(
        400,
        "invalid_priority",
        f"x-gateway-priority must be an integer, not {quoted(value)}",
        param="x-gateway-priority",
    )


def queue_timeout(model: str, waited: float, retry_after: int) -> GatewayError:
    return GatewayError(
        429,
        "queue_timeout",
        f"Every pod of `{model}` stayed busy for the {waited:g} s this request could wait; "
        "retry later.",
        type="server_overloaded",
        param="model",
        retry_after=retry_after,
    )


def request_shed(model: str, retry_after: int) -> GatewayError:
    return GatewayError(
        429,
        "request_shed",
        f"Every pod of `{model}` is busy and this request's priority is sheddable; retry later.",
        type="server_overloaded",
        param="model",
        retry_after=retry_after,
    )


def rate_limit_exceeded(
    kind: str,
    tenant: str,
    limit: int,
    window: float,
    retry_after: int,
    headers: tuple[tuple[str, str], ...],
) -> GatewayError:
    """`kind` is "requests" or "tokens", as OpenAI's error `type` says which limit hit."""
    per = "minute" if window == 60 else f"{window:g} s"
    who = f"tenant `{tenant}`" if tenant else "requests without a tenant"
    return GatewayError(
        429,
        "rate_limit_exceeded",
        f"Rate limit reached for {who} on {kind} per {per}: limit {limit}; retry later.",
        type=kind,
        retry_after=retry_after,
        headers=headers,
    )
