"""The simulated engine's OpenAI Responses and Anthropic Messages endpoints over real
HTTP: whole responses, the event sequences of their streams, errors in each API's shape,
and the trace context echoed back."""

from __future__ import annotations

from typing import Any

import orjson

from tests.unit.test_simulator import Pod, simulator

RESPONSES_STREAM = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 4,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
MESSAGES_STREAM = [
    "message_start",
    "content_block_start",
    "ping",
    *["content_block_delta"] * 3,
    "content_block_stop",
    "message_delta",
    "message_stop",
]


async def named_events(pod: Pod, path: str, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """(event name, decoded data) of every event of a stream; each has both lines."""
    async with pod.http.post(pod.url + path, json={**body, "stream": True}) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        raw = await reply.read()
    assert raw.endswith(b"\n\n")
    events = []
    for block in raw.decode().split("\n\n")[:-1]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        events.append((name[len("event: ") :], orjson.loads(data[len("data: ") :])))
    return events


async def test_responses_json_completed_and_incomplete():
    async with simulator() as pod:
        status, body, _ = await pod.post(
            "/v1/responses", {"model": "m1", "input": "hello", "instructions": "be brief"}
        )
        assert status == 200
        assert (body["object"], body["status"], body["model"]) == ("response", "completed", "m1")
        (message,) = body["output"]
        (part,) = message["content"]
        assert part["type"] == "output_text"
        assert part["text"].startswith(f"sim-{pod.port}: ")
        usage = body["usage"]
        assert usage["output_tokens"] == 4  # the default reply length
        assert usage["total_tokens"] == usage["input_tokens"] + 4
        _, cut, _ = await pod.post(
            "/v1/responses",
            {
                "model": "m1",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                "max_output_tokens": 2,
            },
        )
        assert cut["status"] == "incomplete"
        assert cut["incomplete_details"] == {"reason": "max_output_tokens"}
        assert cut["usage"]["output_tokens"] == 2


async def test_responses_stream_is_the_documented_event_sequence():
    async with simulator() as pod:
        events = await named_events(pod, "/v1/responses", {"model": "m1", "input": "hello"})
        names = [name for name, _ in events]
        assert names == [*RESPONSES_STREAM, "response.completed"]
        assert all(data["type"] == name for name, data in events)
        assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
        text = "".join(data["delta"] for name, data in events if name.endswith(".delta"))
        assert events[-4][1]["text"] == text  # response.output_text.done
        final = events[-1][1]["response"]
        assert final["output"][0]["content"][0]["text"] == text
        assert final["usage"]["output_tokens"] == 4
        assert events[0][1]["response"]["usage"] is None


async def test_responses_stream_cut_by_max_output_tokens_ends_incomplete():
    async with simulator() as pod:
        body = {"model": "m1", "input": "hello", "max_output_tokens": 4}
        events = await named_events(pod, "/v1/responses", body)
        assert events[-1][0] == "response.incomplete"
        assert events[-1][1]["response"]["usage"]["output_tokens"] == 4


async def test_messages_json_and_stream():
    async with simulator() as pod:
        doc = {
            "model": "m1",
            "max_tokens": 3,
            "system": [{"type": "text", "text": "You are terse."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        }
        status, body, _ = await pod.post("/v1/messages", doc)
        assert status == 200
        assert (body["type"], body["role"], body["stop_reason"]) == (
            "message",
            "assistant",
            "max_tokens",
        )
        assert body["content"][0]["text"].startswith(f"sim-{pod.port}: ")
        assert body["usage"]["output_tokens"] == 3
        events = await named_events(pod, "/v1/messages", doc)
        assert [name for name, _ in events] == MESSAGES_STREAM
        assert all(data["type"] == name for name, data in events)
        start = events[0][1]["message"]
        assert start["usage"]["input_tokens"] == body["usage"]["input_tokens"]
        assert events[-2][1]["usage"] == {"output_tokens": 3}
        text = "".join(
            data["delta"]["text"]
            for name, data in events
            if name.endswith("delta") and "index" in data
        )
        assert text == body["content"][0]["text"]


async def test_messages_errors_are_anthropic_errors_and_responses_errors_openai_errors():
    async with simulator() as pod:
        status, body, _ = await pod.post(
            "/v1/messages",
            {"model": "nope", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
        )
        assert status == 404
        assert body == {
            "type": "error",
            "error": {"type": "not_found_error", "message": "The model `nope` does not exist."},
        }
        status, body, _ = await pod.post("/v1/messages", {"model": "m1", "messages": []})
        assert (status, body["error"]["type"]) == (400, "invalid_request_error")
        status, body, _ = await pod.post("/v1/messages", b"{")
        assert (status, body["type"]) == (400, "error")
        status, body, _ = await pod.post("/v1/responses", {"model": "m1"})
        assert (status, body["error"]["param"]) == (400, "input")


async def test_the_trace_context_received_is_echoed():
    async with simulator() as pod:
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        async with pod.http.post(
            pod.url + "/v1/responses",
            json={"model": "m1", "input": "x"},
            headers={"traceparent": traceparent},
        ) as reply:
            assert reply.headers["x-simulator-traceparent"] == traceparent
        _, _, headers = await pod.post("/v1/responses", {"model": "m1", "input": "x"})
        assert "x-simulator-traceparent" not in headers
