"""Token usage from OpenAI responses: a whole JSON body or one streamed event."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


def usage_of(doc: Any) -> Usage | None:
    """The `usage` object of a parsed response or chunk, when it has a valid one."""
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = token_count(usage.get("prompt_tokens"))
    completion = token_count(usage.get("completion_tokens", 0))
    if prompt is None or completion is None:
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


def usage_of_event(data: bytes) -> Usage | None:
    """Usage carried by one SSE event's data, parsing JSON only when it may hold one."""
    if b'"usage"' not in data or b'"usage":null' in data or b'"usage": null' in data:
        return None
    try:
        return usage_of(orjson.loads(data))
    except orjson.JSONDecodeError:
        return None


def token_count(value: Any) -> int | None:
    """A token count: a non-negative integer (JSON booleans are not counts)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
