"""OpenAI's Responses API (`POST /v1/responses`), as vLLM serves it.

The request: `model`, `input` (a string, or a list of items: messages whose `content`
is a string or typed parts, function calls and their outputs) and `instructions` (the
system prompt). The engine renders it as a chat completion; `as_chat` does the same
for the prompt text and precise prefix routing.

Usage is `usage.input_tokens` / `usage.output_tokens`: at the top of a whole response,
and in a stream inside the `response` of its last event (`response.completed`, or
`response.incomplete` / `response.failed`). Output arrives in `response.*.delta` events
(`response.output_text.delta` for text). Errors are OpenAI's error body.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway_extproc.apis.base import Api, input_output_usage
from gateway_extproc.openai.errors import body_of
from gateway_extproc.openai.requests import text_of
from gateway_extproc.openai.usage import Usage

PATH = "/v1/responses"

# The events that close a stream, each carrying the final response object with usage.
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_FINAL_MARKS = tuple(f'"{name}"'.encode() for name in FINAL_EVENTS)
# Every event that carries output is named `response.<part>.delta`. A JSON string can
# only hold a quote escaped, so this never matches inside the generated text unless that
# text ends the value: a false match then costs one event counted as output, no more.
_DELTA_MARK = b'.delta"'


def as_chat(doc: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    instructions = doc.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    items = doc.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            message = _message_of(item)
            if message is not None:
                messages.append(message)
    chat: dict[str, Any] = {"messages": messages}
    tools = _chat_tools(doc.get("tools"))
    if tools:
        chat["tools"] = tools
    return chat


def _message_of(item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    kind = item.get("type", "message")
    if kind == "message" and isinstance(item.get("role"), str):
        return {"role": item["role"], "content": text_of(item.get("content"))}
    if kind == "function_call_output":
        return {"role": "tool", "content": text_of(item.get("output"))}
    if kind == "function_call":
        call = {"name": item.get("name", ""), "arguments": item.get("arguments", "")}
        tool_call = {"id": item.get("call_id", ""), "type": "function", "function": call}
        return {"role": "assistant", "content": "", "tool_calls": [tool_call]}
    return None  # reasoning items, references to stored items: no prompt text here


def _chat_tools(tools: Any) -> list[dict[str, Any]]:
    """Function tools in the chat completions shape (the others have no schema to render)."""
    if not isinstance(tools, list):
        return []
    return [
        {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
        for tool in tools
        if isinstance(tool, dict) and tool.get("type") == "function"
    ]


class ResponsesUsage:
    __slots__ = ("ended", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.ended = False  # a final event went by: the stream's end mark

    def read_body(self, doc: Any) -> None:
        if isinstance(doc, dict):
            self.usage = input_output_usage(doc.get("usage"))

    def read_event(self, data: bytes) -> bool:
        if any(mark in data for mark in _FINAL_MARKS):
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                return False
            if isinstance(event, dict) and event.get("type") in FINAL_EVENTS:
                self.ended = True
                response = event.get("response")
                if isinstance(response, dict):
                    self.usage = input_output_usage(response.get("usage")) or self.usage
                return False
        return _DELTA_MARK in data


RESPONSES = Api("openai-responses", ResponsesUsage, body_of, as_chat=as_chat)
