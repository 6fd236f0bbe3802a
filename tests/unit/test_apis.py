"""The inference APIs' wire formats: which path speaks which, the prompt each request
amounts to, usage from whole bodies and from each API's stream events, error bodies."""

from __future__ import annotations

import orjson
import pytest

from gateway_extproc import errors
from gateway_extproc.apis import OPENAI, api_for
from gateway_extproc.apis.anthropic_messages import MESSAGES
from gateway_extproc.apis.openai_responses import RESPONSES
from gateway_extproc.openai.requests import CHAT_PATH, parse_body
from gateway_extproc.openai.sse import SSEParser
from gateway_extproc.openai.usage import Usage


def parsed(path: str, doc: dict) -> tuple[str, dict, str]:
    """(prompt text, document, endpoint) of `doc` sent to `path`."""
    request = parse_body(path, orjson.dumps(doc), 1 << 20, api_for(path).as_chat)
    assert request.document is not None
    return request.prompt, request.document, request.endpoint


def events_of(stream: bytes) -> list[bytes]:
    parser = SSEParser()
    return parser.feed(stream) + parser.close()


def read_stream(api, stream: bytes) -> tuple[Usage | None, int]:
    """(usage, events that carried output) of a whole SSE stream."""
    reader = api.reader()
    outputs = sum(1 for data in events_of(stream) if reader.read_event(data))
    return reader.usage, outputs


def sse(kind: str, payload: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def test_paths_name_their_api_and_everything_else_is_openai():
    assert api_for("/v1/responses") is RESPONSES
    assert api_for("/v1/messages") is MESSAGES
    assert api_for("/v1/chat/completions") is OPENAI
    assert api_for("/v1/whatever") is OPENAI


# -- the prompt ---------------------------------------------------------------------------


def test_responses_prompt_is_instructions_then_input_as_a_chat():
    prompt, document, endpoint = parsed(
        "/v1/responses",
        {"model": "m", "instructions": "Be brief.", "input": "What is a KV cache?"},
    )
    assert prompt == "system: Be brief.\nuser: What is a KV cache?"
    assert document["messages"][0] == {"role": "system", "content": "Be brief."}
    assert endpoint == CHAT_PATH  # rendered as the chat completion the engine makes of it


def test_responses_input_items_with_parts_tool_calls_and_outputs():
    prompt, document, _ = parsed(
        "/v1/responses",
        {
            "model": "m",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "reasoning", "summary": []},
                "not an item",
            ],
            "tools": [{"type": "function", "name": "get", "parameters": {}}],
        },
    )
    assert prompt == "user: Weather?\nassistant: \ntool: sunny"
    assert document["messages"][1]["tool_calls"][0]["function"]["name"] == "get"
    assert document["tools"] == [
        {"type": "function", "function": {"name": "get", "parameters": {}}}
    ]


def test_messages_prompt_is_system_then_turns_with_text_blocks():
    prompt, document, endpoint = parsed(
        "/v1/messages",
        {
            "model": "m",
            "max_tokens": 8,
            "system": [{"type": "text", "text": "You are terse."}],
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "data": "AA=="}},
                        {"type": "text", "text": "What is this?"},
                    ],
                },
            ],
        },
    )
    assert prompt == "system: You are terse.\nuser: Hi\nassistant: Hello.\nuser: What is this?"
    assert endpoint == CHAT_PATH
    assert len(document["messages"]) == 4


def test_messages_tool_use_and_results_become_chat_tool_calls_and_tool_turns():
    _, document, _ = parsed(
        "/v1/messages",
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "get", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}],
                },
            ],
            "tools": [{"name": "get", "input_schema": {"type": "object"}}],
        },
    )
    roles = [message["role"] for message in document["messages"]]
    assert roles == ["user", "assistant", "tool"]
    assert document["messages"][1]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert document["tools"][0]["function"]["parameters"] == {"type": "object"}


@pytest.mark.parametrize(
    "doc",
    [
        {"model": "m", "messages": "nope", "system": 3, "tools": 7},
        {"model": "m", "messages": [3, {"role": 4}, {"role": "user", "content": 5}]},
        {"model": "m", "messages": [{"role": "user", "content": [1, {"type": "tool_use"}]}]},
    ],
)
def test_odd_messages_bodies_give_what_text_there_is_and_never_fail(doc):
    prompt, document, _ = parsed("/v1/messages", doc)
    assert isinstance(prompt, str)
    assert isinstance(document["messages"], list)


@pytest.mark.parametrize(
    "doc",
    [
        {"model": "m", "input": 5, "instructions": ["x"], "tools": "all"},
        {"model": "m", "input": [{"type": "message", "role": 3}, {"content": "no role"}]},
    ],
)
def test_odd_responses_bodies_give_what_text_there_is_and_never_fail(doc):
    prompt, _, _ = parsed("/v1/responses", doc)
    assert prompt == ""


# -- usage --------------------------------------------------------------------------------


def test_responses_usage_from_a_whole_body():
    reader = RESPONSES.reader()
    reader.read_body({"object": "response", "usage": {"input_tokens": 12, "output_tokens": 5}})
    assert reader.usage == Usage(12, 5)


def responses_stream(final: str = "response.completed", text: str = "Hi there") -> bytes:
    head = {"id": "resp_1", "object": "response", "status": "in_progress", "usage": None}
    done = {**head, "status": final.split(".")[1], "usage": {"input_tokens": 9, "output_tokens": 2}}
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    return b"".join(
        [
            sse("response.created", {"type": "response.created", "response": head}),
            sse("response.in_progress", {"type": "response.in_progress", "response": head}),
            sse("response.output_item.added", {"type": "response.output_item.added"}),
            sse("response.content_part.added", {"type": "response.content_part.added"}),
            *(
                sse(
                    "response.output_text.delta",
                    {"type": "response.output_text.delta", **where, "delta": piece},
                )
                for piece in text.split(" ")
            ),
            sse("response.output_text.done", {"type": "response.output_text.done", "text": text}),
            sse("response.output_item.done", {"type": "response.output_item.done"}),
            sse(final, {"type": final, "response": done}),
        ]
    )


@pytest.mark.parametrize("final", ["response.completed", "response.incomplete"])
def test_responses_stream_usage_comes_in_the_last_event_and_only_deltas_are_output(final):
    usage, outputs = read_stream(RESPONSES, responses_stream(final))
    assert usage == Usage(9, 2)
    assert outputs == 2  # the two text deltas, not the created/added/done events


def test_responses_text_that_names_an_event_type_is_still_text():
    usage, outputs = read_stream(RESPONSES, responses_stream(text='"response.completed" x'))
    assert usage == Usage(9, 2)
    assert outputs == 2


def test_messages_usage_from_a_whole_body():
    reader = MESSAGES.reader()
    reader.read_body({"type": "message", "usage": {"input_tokens": 30, "output_tokens": 7}})
    assert reader.usage == Usage(30, 7)


def messages_stream(delta_usage: dict, text: str = "Hello there") -> bytes:
    start = {"id": "msg_1", "type": "message", "content": [], "usage": {"input_tokens": 21}}
    start["usage"]["output_tokens"] = 1
    deltas = [
        sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
        )
        for t in text.split(" ")
    ]
    return b"".join(
        [
            sse("message_start", {"type": "message_start", "message": start}),
            sse("content_block_start", {"type": "content_block_start", "index": 0}),
            sse("ping", {"type": "ping"}),
            *deltas,
            sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": delta_usage,
                },
            ),
            sse("message_stop", {"type": "message_stop"}),
        ]
    )


def test_messages_stream_input_from_message_start_output_from_message_delta():
    usage, outputs = read_stream(MESSAGES, messages_stream({"output_tokens": 15}))
    assert usage == Usage(21, 15)
    assert outputs == 2


def test_messages_delta_that_repeats_the_input_count_wins_over_the_start():
    usage, _ = read_stream(MESSAGES, messages_stream({"input_tokens": 25, "output_tokens": 3}))
    assert usage == Usage(25, 3)


def test_messages_text_that_is_an_event_name_is_output_not_usage():
    usage, outputs = read_stream(MESSAGES, messages_stream({"output_tokens": 2}, "message_start"))
    assert usage == Usage(21, 2)
    assert outputs == 1


def ended_after(api, stream: bytes) -> list[bool]:
    """Whether `api`'s reader says the stream ended, after each event of `stream`."""
    reader = api.reader()
    seen = []
    for data in events_of(stream):
        reader.read_event(data)
        seen.append(reader.ended)
    return seen


@pytest.mark.parametrize(
    ("api", "stream"),
    [
        (OPENAI, b'data: {"choices":[{"delta":{"content":"[DONE]"}}]}\n\ndata: [DONE]\n\n'),
        (RESPONSES, responses_stream("response.completed", '"response.completed" x')),
        (RESPONSES, responses_stream("response.incomplete")),
        (RESPONSES, responses_stream("response.failed")),
        (MESSAGES, messages_stream({"output_tokens": 2}, "message_stop")),
    ],
    ids=["chat", "responses-completed", "responses-incomplete", "responses-failed", "messages"],
)
def test_each_api_stream_ends_with_its_own_end_mark_and_not_with_text_that_names_it(api, stream):
    seen = ended_after(api, stream)
    assert seen[-1] is True
    assert not any(seen[:-1])


def test_an_end_mark_of_another_api_does_not_end_a_stream():
    chat_end = b"data: [DONE]\n\n"
    assert ended_after(RESPONSES, chat_end) == [False]
    assert ended_after(MESSAGES, chat_end) == [False]
    assert not any(ended_after(OPENAI, messages_stream({"output_tokens": 2})))
    assert not any(ended_after(MESSAGES, responses_stream()))


@pytest.mark.parametrize("api", [RESPONSES, MESSAGES])
@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"message_start","message":{"usage":{"input_tokens":-1}}',
        b'{"type":"message_delta","usage":"lots"}',
        b'{"type":"response.completed","response":[1]}',
        b'["message_delta", "response.completed"]',
        b"not json response.completed message_start",
    ],
)
def test_broken_usage_events_are_skipped(api, data):
    reader = api.reader()
    assert reader.read_event(data) is False
    assert reader.usage is None


# -- errors -------------------------------------------------------------------------------


def test_anthropic_errors_have_anthropic_types_by_status():
    assert orjson.loads(MESSAGES.error_body(errors.model_not_found("m"))) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model `m` does not exist."},
    }
    kinds = {
        status: orjson.loads(MESSAGES.error_body(errors.GatewayError(status, "x", "y")))["error"][
            "type"
        ]
        for status in (400, 413, 429, 500, 503)
    }
    assert kinds == {
        400: "invalid_request_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        503: "overloaded_error",
    }


def test_responses_errors_are_openai_errors():
    body = orjson.loads(RESPONSES.error_body(errors.model_not_found("m")))
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["type"] == "invalid_request_error"
