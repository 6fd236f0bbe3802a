"""Parse an OpenAI-style inference request body into what routing needs.

Only `model` is required; `stream` must be a boolean when present. The prompt text is
extracted leniently (it feeds prefix-aware routing, never validation): the engine is the
authority on the rest of the schema and answers its own errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway_extproc import errors

MAX_MODEL_NAME = 512

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
MODELS_PATH = "/v1/models"


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    model: str
    stream: bool = False
    prompt: str = ""
    include_usage: bool = False
    # The parsed body, for rendering the prompt as the engine will (precise prefix routing),
    # under the rules of `endpoint` (the request's path, or the chat path for an API whose
    # request amounts to a chat completion: see `as_chat` in parse_body).
    document: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    user: str = ""  # OpenAI's end-user id, when the body names one
    endpoint: str = ""


def strip_query(path: str) -> str:
    return path.split("?", 1)[0]


def parse_body(
    path: str,
    body: bytes,
    max_bytes: int,
    as_chat: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> InferenceRequest:
    """Parse `body` sent to `path`; raise GatewayError (400/413) for anything unusable.

    `as_chat` turns the body of another API (OpenAI Responses, Anthropic Messages) into
    the chat completion the engine renders it as; the prompt is then read from that."""
    if len(body) > max_bytes:
        raise errors.request_too_large(max_bytes)
    if not body.strip():
        raise errors.invalid_body("the request body is empty; expected a JSON object")
    try:
        doc = load_json(body)
    except ValueError as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise errors.invalid_body(f"the request body is not valid JSON: {message}") from None
    if not isinstance(doc, dict):
        raise errors.invalid_body(f"the request body must be a JSON object, not {_json_type(doc)}")
    model = doc.get("model")
    if model is None:
        raise errors.model_required()
    if not isinstance(model, str):
        raise errors.model_required(f"`model` must be a string, not {_json_type(model)}")
    if not model.strip():
        raise errors.model_required("`model` must not be empty")
    if len(model) > MAX_MODEL_NAME:
        raise errors.model_required(f"`model` is longer than {MAX_MODEL_NAME} characters")
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise errors.GatewayError(
            400, "invalid_request_body", "`stream` must be a boolean", param="stream"
        )
    options = doc.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    user = doc.get("user")
    endpoint = strip_query(path)
    if as_chat is not None:
        doc, endpoint = as_chat(doc), CHAT_PATH
    return InferenceRequest(
        model=model,
        stream=stream,
        prompt=_prompt_text(endpoint, doc),
        include_usage=include_usage,
        document=doc,
        user=user if isinstance(user, str) else "",
        endpoint=endpoint,
    )


def load_json(body: bytes) -> Any:
    """`body` parsed; ValueError (a JSONDecodeError) if it is not JSON.

    orjson refuses a number beyond the range of a double (`1e400`), which JSON allows: such
    a body is read again by the standard library, where it becomes infinity, so that the
    engine, not the gateway, judges the field (vLLM answers 400 naming it). Only the
    literals JSON does not have (NaN, Infinity) stay refused."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(body, parse_constant=_not_json)
        except (ValueError, RecursionError):
            raise exc from None


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not a JSON value")


def _prompt_text(path: str, doc: dict[str, Any]) -> str:
    if path == CHAT_PATH or "messages" in doc:
        return _messages_text(doc.get("messages"))
    if path == EMBEDDINGS_PATH or "input" in doc:
        return text_of(doc.get("input"))
    return text_of(doc.get("prompt"))


def _messages_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    parts = []
    for message in messages:
        if isinstance(message, dict):
            parts.append(f"{message.get('role', '')}: {text_of(message.get('content'))}")
    return "\n".join(parts)


def text_of(value: Any) -> str:
    """Text of a prompt/content value: a string, a list of strings or content parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for item in value:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                texts.append(item["text"])
        return "\n".join(texts)
    return ""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def rewrite_body(body: bytes, *, model: str = "", include_usage: bool = False) -> bytes | None:
    """`body` (already validated) naming `model` instead (an alias's target) and/or asking
    for the streamed usage chunk; None when it cannot be written back as it was sent."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        # Valid JSON only load_json reads (a number beyond a double): written back, that
        # number would read null, so the body goes as it was sent.
        return None
    if model:
        doc["model"] = model
    if include_usage:
        options = doc.get("stream_options")
        doc["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    return orjson.dumps(doc)
