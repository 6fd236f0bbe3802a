"""Request parsing with every bad body we could think of."""

from __future__ import annotations

import pytest

from gateway_extproc.errors import GatewayError
from gateway_extproc.openai.requests import parse_body

LIMIT = 64 * 1024


def rejected(body: bytes, path: str = "/v1/chat/completions") -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        parse_body(path, body, LIMIT)
    return caught.value


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_request_body"),
        (b"   \n", "invalid_request_body"),
        (b"{", "invalid_request_body"),
        (b"{'model': 'x'}", "invalid_request_body"),
        (b'{"model": "x",}', "invalid_request_body"),
        (b'{"model": NaN}', "invalid_request_body"),
        (b"\xff\xfe\x00garbage", "invalid_request_body"),
        (b"null", "invalid_request_body"),
        (b"42", "invalid_request_body"),
        (b'"model"', "invalid_request_body"),
        (b'[{"model": "x"}]', "invalid_request_body"),
        (b"[" * 2000 + b"]" * 2000, "invalid_request_body"),
        (b"{}", "model_required"),
        (b'{"model": null}', "model_required"),
        (b'{"model": ""}', "model_required"),
        (b'{"model": "   "}', "model_required"),
        (b'{"model": 12}', "model_required"),
        (b'{"model": ["a"]}', "model_required"),
        (b'{"model": {"name": "a"}}', "model_required"),
        (b'{"model": true}', "model_required"),
        (b'{"model": "' + b"m" * 600 + b'"}', "model_required"),
        (b'{"model": "x", "stream": "yes"}', "invalid_request_body"),
        (b'{"model": "x", "stream": 1}', "invalid_request_body"),
    ],
)
def test_bad_bodies_are_400_with_the_right_code(body, code):
    error = rejected(body)
    assert error.status == 400
    assert error.code == code
    assert error.message


def test_body_over_the_limit_is_413():
    error = rejected(b'{"model": "x", "prompt": "' + b"a" * LIMIT + b'"}')
    assert (error.status, error.code) == (413, "request_too_large")


def test_chat_prompt_is_the_messages_text_including_content_parts():
    parsed = parse_body(
        "/v1/chat/completions",
        b'{"model": "m", "stream": true, "stream_options": {"include_usage": true},'
        b' "messages": [{"role": "system", "content": "be brief"},'
        b' {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url"}]},'
        b' "junk", {"role": "user", "content": null}]}',
        LIMIT,
    )
    assert parsed.model == "m"
    assert parsed.stream is True
    assert parsed.include_usage is True
    assert parsed.prompt == "system: be brief\nuser: hello\nuser: "


@pytest.mark.parametrize(
    ("path", "body", "prompt"),
    [
        ("/v1/completions", b'{"model": "m", "prompt": "once upon"}', "once upon"),
        ("/v1/completions", b'{"model": "m", "prompt": ["a", "b"]}', "a\nb"),
        ("/v1/completions", b'{"model": "m", "prompt": [1, 2, 3]}', ""),
        ("/v1/embeddings", b'{"model": "m", "input": "text"}', "text"),
        ("/v1/embeddings?x=1", b'{"model": "m", "input": ["t1", "t2"]}', "t1\nt2"),
        ("/v1/chat/completions", b'{"model": "m", "messages": "not a list"}', ""),
    ],
)
def test_prompt_extraction_is_lenient(path, body, prompt):
    assert parse_body(path, body, LIMIT).prompt == prompt


def test_stream_null_means_not_streaming():
    assert parse_body("/v1/completions", b'{"model": "m", "stream": null}', LIMIT).stream is False
