"""SSE parsing across chunk boundaries, and usage extraction."""

from __future__ import annotations

import pytest

from gateway_extproc.openai.sse import SSEParser
from gateway_extproc.openai.usage import Usage, usage_of, usage_of_event

STREAM = (
    b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
    b'data:{"choices":[{"delta":{"content":"b"}}]}\n\n'
    b": keep-alive comment\n\n"
    b"event: message\nid: 7\n"
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)
EXPECTED = [
    b'{"choices":[{"delta":{"content":"a"}}],"usage":null}',
    b'{"choices":[{"delta":{"content":"b"}}]}',
    b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}',
    b"[DONE]",
]


def feed_all(parser: SSEParser, chunks: list[bytes]) -> list[bytes]:
    events: list[bytes] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events + parser.close()


def test_whole_stream_in_one_chunk():
    assert feed_all(SSEParser(), [STREAM]) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 7, 13, 64])
def test_every_split_position_gives_the_same_events(size):
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert feed_all(SSEParser(), chunks) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 5, 9])
def test_crlf_line_ends_split_anywhere(size):
    crlf = STREAM.replace(b"\n", b"\r\n")
    chunks = [crlf[i : i + size] for i in range(0, len(crlf), size)]
    assert feed_all(SSEParser(), chunks) == EXPECTED


def test_multi_line_data_is_joined_with_newlines_even_split_between_cr_and_lf():
    parser = SSEParser()
    events = feed_all(parser, [b"data: line1\r", b"\ndata: line2\r\n\r\n"])
    assert events == [b"line1\nline2"]


def test_usage_and_done_in_one_chunk():
    parser = SSEParser()
    events = parser.feed(
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert usage_of_event(events[0]) == Usage(3, 4)
    assert events[1] == b"[DONE]"


def test_an_unterminated_last_event_is_still_read_at_the_end():
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]") == []
    assert parser.close() == [b"[DONE]"]


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {"usage": None},
        {"usage": "lots"},
        {"usage": {"prompt_tokens": "5"}},
        {"usage": {"prompt_tokens": -1, "completion_tokens": 2}},
        {"usage": {"prompt_tokens": True, "completion_tokens": 2}},
    ],
)
def test_invalid_usage_is_ignored(doc):
    assert usage_of(doc) is None


def test_usage_of_embeddings_has_no_completion_tokens():
    assert usage_of({"usage": {"prompt_tokens": 8, "total_tokens": 8}}) == Usage(8, 0)


def test_usage_of_event_skips_chunks_with_null_usage_and_broken_json():
    assert usage_of_event(b'{"usage":null,"choices":[]}') is None
    assert usage_of_event(b'{"usage": {"prompt_tokens": 1') is None
