"""OpenAI's Responses API and Anthropic's Messages API as vLLM serves them: requests
reduced to a chat prompt, whole responses, and the SSE event sequences of a stream.

Both are written from the public API references: a Responses stream is
`response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, one `response.output_text.delta` per token,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`
and `response.completed` (or `response.incomplete` when `max_output_tokens` cut it), each
an `event:` line naming the type and a `data:` line with a `sequence_number`. A Messages
stream is `message_start` (with the input token count), `content_block_start`, `ping`,
one `content_block_delta` per token, `content_block_stop`, `message_delta` (stop reason
and output token count) and `message_stop`. Neither ends with `data: [DONE]`.

A Responses request stops at `max_output_tokens` when given (status `incomplete`), else
after the simulator's default reply length (`completed`); a Messages request always
stops at its required `max_tokens` (stop reason `max_tokens`).
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from gateway_extproc.apis.anthropic_messages import ERROR_TYPES
from gateway_extproc.devtools.simulator import text
from gateway_extproc.devtools.simulator.protocol import (
    ApiError,
    GenerationRequest,
    invalid,
    missing,
    model_of,
    stream_of,
)

RESPONSES_PATH = "/v1/responses"
MESSAGES_PATH = "/v1/messages"


def event(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class EventWriter(Protocol):
    """What the simulator's app needs of a Responses or Messages response: the whole
    body, or the events of a stream (the prompt's token count is given at construction)."""

    def body(self, content: str, output_tokens: int) -> bytes: ...

    def opening(self) -> bytes: ...

    def token(self, token: str) -> bytes: ...

    def closing(self, output_tokens: int) -> bytes: ...


def anthropic_error_body(error: ApiError) -> bytes:
    kind = ERROR_TYPES.get(error.status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": error.message}})


# --- OpenAI Responses ------------------------------------------------------------------


def parse_responses(doc: dict[str, Any]) -> tuple[GenerationRequest, dict[str, Any]]:
    """The request as the engine runs it, and as the chat completion it is rendered as."""
    turns: list[tuple[str, str]] = []
    instructions = doc.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise invalid("`instructions` must be a string", "instructions")
        turns.append(("system", instructions))
    items = doc.get("input")
    if items is None:
        raise missing("input")
    if isinstance(items, str):
        turns.append(("user", items))
    elif isinstance(items, list) and items:
        turns.extend(_input_turn(item, index) for index, item in enumerate(items))
    else:
        raise invalid("`input` must be a string or a non-empty array of items", "input")
    max_tokens = doc.get("max_output_tokens")
    if max_tokens is not None and (not _is_count(max_tokens) or max_tokens < 1):
        raise invalid("`max_output_tokens` must be an integer of at least 1", "max_output_tokens")
    return _chat_request(doc, turns, "input", max_tokens)


def _input_turn(item: Any, index: int) -> tuple[str, str]:
    param = f"input[{index}]"
    if not isinstance(item, dict):
        raise invalid(f"`{param}` must be an object", param)
    kind = item.get("type", "message")
    if kind == "function_call_output":
        return "tool", _content_text(item.get("output"), param)
    if kind == "function_call":
        return "assistant", f"{item.get('name', '')}({item.get('arguments', '')})"
    if kind != "message":
        raise invalid(f"`{param}.type` {kind!r} is not supported here", param)
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise invalid(f"`{param}.role` must be user, assistant, system or developer", param)
    return role, _content_text(item.get("content"), param)


def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"`{param}.content` parts must be typed objects", param)
            if isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                parts.append(f"<|{part['type']}|>")  # an image: a placeholder token
        return "\n".join(parts)
    raise invalid(f"`{param}.content` must be a string or an array of parts", param)


class ResponsesWriter:
    """The JSON body and the stream events of one Responses API response."""

    def __init__(
        self,
        response_id: str,
        created: int,
        doc: dict[str, Any],
        request: GenerationRequest,
        prompt_tokens: int,
    ) -> None:
        self._id = response_id
        self._prompt_tokens = prompt_tokens
        self._message_id = "msg_" + response_id.removeprefix("resp_")
        self._created = created
        self._doc = doc
        self._request = request
        self._sequence = 0
        self._text: list[str] = []

    def body(self, content: str, output_tokens: int) -> bytes:
        self._text = [content]
        status = self._final_status(output_tokens)
        return orjson.dumps(self._response(status, (self._prompt_tokens, output_tokens)))

    # -- a stream ---------------------------------------------------------------------

    def opening(self) -> bytes:
        response = self._response("in_progress", None)  # no output nor usage yet
        item = self._message("in_progress", [])
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return b"".join(
            [
                self._event("response.created", response=response),
                self._event("response.in_progress", response=response),
                self._event("response.output_item.added", output_index=0, item=item),
                self._event("response.content_part.added", **self._where(), part=part),
            ]
        )

    def token(self, token: str) -> bytes:
        self._text.append(token)
        return self._event("response.output_text.delta", **self._where(), delta=token, logprobs=[])

    def closing(self, output_tokens: int) -> bytes:
        content = "".join(self._text)
        part = {"type": "output_text", "text": content, "annotations": []}
        status = self._final_status(output_tokens)
        return b"".join(
            [
                self._event(
                    "response.output_text.done", **self._where(), text=content, logprobs=[]
                ),
                self._event("response.content_part.done", **self._where(), part=part),
                self._event(
                    "response.output_item.done",
                    output_index=0,
                    item=self._message("completed", [part]),
                ),
                self._event(
                    f"response.{status}",
                    response=self._response(status, (self._prompt_tokens, output_tokens)),
                ),
            ]
        )

    # -- pieces -----------------------------------------------------------------------

    def _final_status(self, output_tokens: int) -> str:
        limit = self._request.max_tokens
        return "incomplete" if limit is not None and output_tokens >= limit else "completed"

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._message_id, "output_index": 0, "content_index": 0}

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event(kind, payload)

    def _message(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self._message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _response(self, status: str, tokens: tuple[int, int] | None) -> dict[str, Any]:
        """The response object; `tokens` (input, output) once it is done."""
        doc = self._doc
        message = self._message("completed", [_output_text("".join(self._text))])
        return {
            "id": self._id,
            "object": "response",
            "created_at": self._created,
            "status": status,
            "model": self._request.model,
            "instructions": doc.get("instructions"),
            "max_output_tokens": self._request.max_tokens,
            "output": [message] if tokens is not None else [],
            "usage": _responses_usage(*tokens) if tokens is not None else None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "error": None,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "temperature": doc.get("temperature", 1.0),
            "top_p": doc.get("top_p", 1.0),
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "metadata": {},
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "background": False,
            "service_tier": "auto",
            "user": None,
        }


def _output_text(content: str) -> dict[str, Any]:
    return {"type": "output_text", "text": content, "annotations": [], "logprobs": []}


def _responses_usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


# --- Anthropic Messages ----------------------------------------------------------------


def parse_messages(doc: dict[str, Any]) -> tuple[GenerationRequest, dict[str, Any]]:
    """The request as the engine runs it, and as the chat completion it is rendered as."""
    turns: list[tuple[str, str]] = []
    system = doc.get("system")
    if system is not None:
        turns.append(("system", _blocks_text(system, "system")))
    messages = doc.get("messages")
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty array", "messages")
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise invalid(f"`{param}.role` must be user or assistant", param)
        turns.append((message["role"], _blocks_text(message.get("content"), param)))
    max_tokens = doc.get("max_tokens")
    if max_tokens is None:
        raise missing("max_tokens")
    if not _is_count(max_tokens) or max_tokens < 1:
        raise invalid("`max_tokens` must be an integer of at least 1", "max_tokens")
    return _chat_request(doc, turns, "messages", max_tokens)


def _blocks_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"`{param}` content must be a string or an array of blocks", param)
    parts = []
    for block in content:
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid(f"`{param}` content blocks must be typed objects", param)
        if block["type"] == "text":
            if not isinstance(block.get("text"), str):
                raise invalid(f"`{param}` text blocks need a string `text`", param)
            parts.append(block["text"])
        else:
            parts.append(f"<|{block['type']}|>")  # images, tool use and results
    return "\n".join(parts)


class MessagesWriter:
    """The JSON body and the stream events of one Messages API response."""

    def __init__(self, message_id: str, model: str, prompt_tokens: int) -> None:
        self._id = message_id
        self._model = model
        self._prompt_tokens = prompt_tokens

    def body(self, content: str, output_tokens: int) -> bytes:
        message = self._message([{"type": "text", "text": content}], "max_tokens")
        message["usage"] = {"input_tokens": self._prompt_tokens, "output_tokens": output_tokens}
        return orjson.dumps(message)

    def opening(self) -> bytes:
        message = self._message([], None)
        message["usage"] = {"input_tokens": self._prompt_tokens, "output_tokens": 1}
        block = {"type": "text", "text": ""}
        return b"".join(
            [
                event("message_start", {"type": "message_start", "message": message}),
                event(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": block},
                ),
                event("ping", {"type": "ping"}),
            ]
        )

    def token(self, token: str) -> bytes:
        delta = {"type": "text_delta", "text": token}
        return event(
            "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
        )

    def closing(self, output_tokens: int) -> bytes:
        delta = {"stop_reason": "max_tokens", "stop_sequence": None}
        return b"".join(
            [
                event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": delta,
                        "usage": {"output_tokens": output_tokens},
                    },
                ),
                event("message_stop", {"type": "message_stop"}),
            ]
        )

    def _message(self, content: list[dict[str, Any]], stop: str | None) -> dict[str, Any]:
        return {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
        }


def _chat_request(
    doc: dict[str, Any], turns: list[tuple[str, str]], prompt_param: str, max_tokens: int | None
) -> tuple[GenerationRequest, dict[str, Any]]:
    """Both APIs run as a chat: the prompt rendered from `turns`, usage always reported."""
    request = GenerationRequest(
        model=model_of(doc),
        prompt=text.render_chat(turns),
        prompt_param=prompt_param,
        max_tokens=max_tokens,
        stream=stream_of(doc),
        include_usage=True,
    )
    return request, _chat_doc(turns)


def _chat_doc(turns: list[tuple[str, str]]) -> dict[str, Any]:
    """The chat completion a request is rendered as (for `--tokenizer`)."""
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
