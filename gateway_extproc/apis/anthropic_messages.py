"""Anthropic's Messages API (`POST /v1/messages`), as vLLM serves it.

The request: `model`, `system` (a string or text blocks) and `messages`, whose
`content` is a string or content blocks (text, images, tool use and tool results). The
engine renders it as a chat completion; `as_chat` does the same for the prompt text and
precise prefix routing.

Usage is `usage.input_tokens` / `usage.output_tokens` at the top of a whole message. A
stream says the input count in `message_start` (`message.usage.input_tokens`) and the
output count, cumulative, in `message_delta` (`usage.output_tokens`); output arrives in
`content_block_delta` events, and `message_stop` ends the stream. Errors are Anthropic's body:
`{"type": "error", "error": {"type": "not_found_error", "message": ...}}`.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway_extproc.apis.base import Api, input_output_usage
from gateway_extproc.errors import GatewayError
from gateway_extproc.openai.requests import text_of
from gateway_extproc.openai.usage import Usage, token_count

PATH = "/v1/messages"

# The events read as JSON: the two that carry usage and the stream's end mark. The rest
# are told by the mark alone, or skipped.
_PARSED_MARKS = (b'"message_start"', b'"message_delta"', b'"message_stop"')

# Anthropic's error types by HTTP status; anything else is `api_error`.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(error: GatewayError) -> bytes:
    kind = ERROR_TYPES.get(error.status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": error.message}})


def as_chat(doc: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    system = text_of(doc.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    turns = doc.get("messages")
    for turn in turns if isinstance(turns, list) else ():
        if isinstance(turn, dict) and isinstance(turn.get("role"), str):
            messages.extend(_chat_messages(turn["role"], turn.get("content")))
    chat: dict[str, Any] = {"messages": messages}
    raw_tools = doc.get("tools")
    tools = [
        {
            "type": "function",
            "function": {
                "name": tool.get("name", ""),
                "description": tool.get("description", ""),
                "parameters": tool.get("input_schema", {}),
            },
        }
        for tool in (raw_tools if isinstance(raw_tools, list) else ())
        if isinstance(tool, dict)
    ]
    if tools:
        chat["tools"] = tools
    return chat


def _chat_messages(role: str, content: Any) -> list[dict[str, Any]]:
    """One Anthropic turn as chat messages: tool results become `tool` messages of their
    own, tool use the assistant's `tool_calls`, text blocks its content."""
    if not isinstance(content, list):
        return [{"role": role, "content": text_of(content)}]
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_result":
            out.append({"role": "tool", "content": text_of(block.get("content"))})
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            function = {"name": block.get("name", ""), "arguments": arguments}
            calls.append({"id": block.get("id", ""), "type": "function", "function": function})
    if texts or calls or not out:
        message: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


class MessagesUsage:
    __slots__ = ("_input", "_output", "ended", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.ended = False  # `message_stop` went by: the stream's end mark
        self._input: int | None = None
        self._output = 0

    def read_body(self, doc: Any) -> None:
        if isinstance(doc, dict):
            self.usage = input_output_usage(doc.get("usage"))

    def read_event(self, data: bytes) -> bool:
        # A JSON string holds a quote only escaped: these marks match event types (or a
        # text delta that is exactly such a word, which the type check below tells).
        if b'"content_block_delta"' in data:
            return True
        if not any(mark in data for mark in _PARSED_MARKS):
            return False  # content_block_start/stop, ping
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(event, dict):
            return False
        kind = event.get("type")
        if kind == "message_stop":
            self.ended = True
            return False
        if kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
        elif kind == "message_delta":
            usage = event.get("usage")
        else:
            return False
        if isinstance(usage, dict):
            self._read_counts(usage)
        return False

    def _read_counts(self, usage: dict[str, Any]) -> None:
        # message_delta's counts are cumulative; it may repeat the input count or not.
        prompt = token_count(usage.get("input_tokens"))
        if prompt is not None:
            self._input = prompt
        completion = token_count(usage.get("output_tokens"))
        if completion is not None:
            self._output = completion
        if self._input is not None:
            self.usage = Usage(prompt_tokens=self._input, completion_tokens=self._output)


MESSAGES = Api("anthropic-messages", MessagesUsage, error_body, as_chat=as_chat)
