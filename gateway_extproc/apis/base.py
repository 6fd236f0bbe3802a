"""What the processor needs from each inference API's wire format.

The request side is common to every API (a JSON body naming `model`, a boolean
`stream`; openai/requests.py parses it); what differs is where the prompt is, how the
response reports token usage (in a whole JSON body and in a stream of events), which
event ends a stream, and the shape of an error body.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway_extproc.errors import GatewayError
from gateway_extproc.openai.usage import Usage, token_count


class UsageReader(Protocol):
    """Reads one response's token usage and watches for its stream's end mark; a new one
    per response."""

    usage: Usage | None
    # The API's end-of-stream event went by (chat's `data: [DONE]`, the Responses API's
    # `response.completed`/`.incomplete`/`.failed`, Anthropic's `message_stop`): the
    # client has the whole response even if the stream is cut right after. A stream cut
    # before it was cut short.
    ended: bool

    def read_body(self, doc: Any) -> None:
        """A whole (non-streamed) response, parsed."""
        ...

    def read_event(self, data: bytes) -> bool:
        """One streamed event's data; True when the event carries output (a token), which
        is what time to first token and inter-token latency are measured on. Sets
        `usage` when the event reports it and `ended` when it is the end mark."""
        ...


@dataclass(frozen=True, slots=True)
class Api:
    name: str  # as logs and spans say it
    reader: Callable[[], UsageReader]
    error_body: Callable[[GatewayError], bytes]
    # The request as the chat completion the engine renders it as (for the prompt text
    # and precise prefix routing); None when the body is read as it is.
    as_chat: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # Its streams report usage only when asked (`stream_options.include_usage`), which
    # --inject-include-usage does; the other APIs' streams always carry it.
    usage_on_request: bool = False


def input_output_usage(usage: Any) -> Usage | None:
    """`{"input_tokens", "output_tokens"}`, the usage object of OpenAI's Responses API and
    Anthropic's Messages API."""
    if not isinstance(usage, dict):
        return None
    prompt = token_count(usage.get("input_tokens"))
    completion = token_count(usage.get("output_tokens", 0))
    if prompt is None or completion is None:
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion)
