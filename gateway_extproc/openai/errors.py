"""OpenAI's error body, the shape every refusal is written in on the wire:
`{"error": {"message", "type", "param", "code"}}`.

The errors themselves (`GatewayError` and its builders) are in gateway_extproc/errors.py,
shared with routing.
"""

from __future__ import annotations

import orjson

from gateway_extproc.errors import GatewayError


def error_body(message: str, type: str, param: str | None, code: str) -> bytes:
    """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def body_of(error: GatewayError) -> bytes:
    """`error` written as OpenAI's error body."""
    return error_body(error.message, error.type, error.param, error.code)
