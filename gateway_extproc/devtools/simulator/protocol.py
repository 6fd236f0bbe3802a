"""The OpenAI wire format as vLLM speaks it: request validation and response bodies.

Validation is strict where a real engine is strict (types, ranges, unknown model) and
ignores sampling knobs the simulator has no use for (temperature, top_p, stop...).
Every problem is an `ApiError`, rendered as `{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway_extproc.devtools.simulator import text
from gateway_extproc.openai.errors import error_body
from gateway_extproc.openai.requests import load_json


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404, f"The model `{model}` does not exist.", code="model_not_found", param="model"
    )


def simulated_failure() -> ApiError:
    return ApiError(
        500,
        "simulated engine failure (fault injection)",
        code="simulated_failure",
        type="server_error",
    )


def context_too_long(limit: int, prompt_len: int, max_tokens: int, param: str) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for "
        "the completion). Please reduce the length of the prompt or completion.",
        code="context_length_exceeded",
        param=param,
    )


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A chat or completions request reduced to what the engine needs."""

    model: str
    prompt: str | tuple[int, ...]  # text (chat already templated) or token ids
    prompt_param: str  # the field a prompt error points at
    max_tokens: int | None
    stream: bool
    include_usage: bool


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str | tuple[int, ...], ...]
    dimensions: int
    base64: bool


DEFAULT_EMBEDDING_DIMENSIONS = 64
MAX_EMBEDDING_DIMENSIONS = 8192


def load_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise ApiError(
            400, "the request body is empty; expected a JSON object", code="invalid_json"
        )
    try:
        # As vLLM (Python's json) reads it: a number beyond a double (1e400) is infinity,
        # and the field it is in is judged (a 400 naming it), not the JSON.
        doc = load_json(body)
    except ValueError as exc:
        raise ApiError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(doc, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return doc


def parse_chat(doc: dict[str, Any]) -> GenerationRequest:
    messages = doc.get("messages")
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty array", "messages")
    turns = [_message(message, index) for index, message in enumerate(messages)]
    _one_choice(doc)
    max_tokens = _max_tokens(doc, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _max_tokens(doc, "max_tokens")
    return GenerationRequest(
        model=model_of(doc),
        prompt=text.render_chat(turns),
        prompt_param="messages",
        max_tokens=max_tokens,
        stream=stream_of(doc),
        include_usage=_include_usage(doc),
    )


def parse_completion(doc: dict[str, Any]) -> GenerationRequest:
    prompt = doc.get("prompt")
    if prompt is None:
        raise missing("prompt")
    # A one-element batch is unwrapped; larger batches would need several choices.
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise invalid("the simulator takes one prompt per request", "prompt")
        prompt = prompt[0]
    parsed = prompt if isinstance(prompt, str) else _token_ids(prompt, "prompt")
    _one_choice(doc)
    if not parsed:
        raise invalid("the prompt cannot be empty", "prompt")
    return GenerationRequest(
        model=model_of(doc),
        prompt=parsed,
        prompt_param="prompt",
        max_tokens=_max_tokens(doc, "max_tokens"),
        stream=stream_of(doc),
        include_usage=_include_usage(doc),
    )


def parse_embedding(doc: dict[str, Any]) -> EmbeddingRequest:
    raw = doc.get("input")
    if raw is None:
        raise missing("input")
    inputs: list[str | tuple[int, ...]]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        inputs = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(item, list) for item in raw):
        inputs = [_token_ids(item, "input") for item in raw]
    elif isinstance(raw, list) and raw:
        inputs = [_token_ids(raw, "input")]
    else:
        raise invalid(
            "`input` must be a string, an array of strings or token ids, not empty", "input"
        )
    dimensions = doc.get("dimensions")
    if dimensions is None:
        dimensions = DEFAULT_EMBEDDING_DIMENSIONS
    elif not _is_int(dimensions) or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
        raise invalid(f"`dimensions` must be an integer from 1 to {MAX_EMBEDDING_DIMENSIONS}")
    encoding = doc.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid("`encoding_format` must be `float` or `base64`", "encoding_format")
    return EmbeddingRequest(
        model=model_of(doc),
        inputs=tuple(inputs),
        dimensions=int(dimensions),
        base64=encoding == "base64",
    )


def model_of(doc: dict[str, Any]) -> str:
    model = doc.get("model")
    if model is None:
        raise missing("model")
    if not isinstance(model, str) or not model:
        raise invalid("`model` must be a non-empty string", "model")
    return model


def missing(name: str) -> ApiError:
    return ApiError(400, f"`{name}` is required", code="missing_required_parameter", param=name)


def _message(message: Any, index: int) -> tuple[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(f"`{param}` must be an object", param)
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise invalid(f"`{param}.role` must be a non-empty string", f"{param}.role")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return role, content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"`{param}.content` parts must be typed objects", param)
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise invalid(f"`{param}.content` text parts need a string `text`", param)
                parts.append(part["text"])
            else:
                # Images, audio...: a placeholder token stands in for the encoder output.
                parts.append(f"<|{part['type']}|>")
        return role, "\n".join(parts)
    raise invalid(f"`{param}.content` must be a string or an array of parts", param)


def _token_ids(value: Any, param: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(_is_int(item) and item >= 0 for item in value):
        raise invalid(f"`{param}` must be a string or an array of token ids", param)
    return tuple(int(item) for item in value)


def _max_tokens(doc: dict[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise invalid(f"`{name}` must be an integer of at least 1", name)
    return int(value)


def _one_choice(doc: dict[str, Any]) -> None:
    n = doc.get("n")
    if n is not None and n != 1:
        raise invalid("the simulator generates one choice per request (`n` must be 1)", "n")


def stream_of(doc: dict[str, Any]) -> bool:
    value = doc.get("stream")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid("`stream` must be a boolean", "stream")
    return value


def _include_usage(doc: dict[str, Any]) -> bool:
    options = doc.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("`stream_options` must be an object", "stream_options")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise invalid("`stream_options.include_usage` must be a boolean", "stream_options")
    return value


def _is_int(value: Any) -> bool:
    # JSON `true` decodes to a bool, which Python counts as an int; reject it.
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return value.is_integer() and math.isfinite(value)
    return isinstance(value, int)


# --- responses -----------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def choice_response(
    request_id: str,
    created: int,
    model: str,
    content: str,
    finish: str,
    use: dict[str, int],
    chat: bool,
) -> bytes:
    """The whole body of a chat (`chat`) or completions response: one choice."""
    if chat:
        message = {"role": "assistant", "content": content, "tool_calls": []}
        choice = _choice("message", message, finish)
    else:
        choice = _choice("text", content, finish)
    return orjson.dumps(
        {
            "id": request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": use,
        }
    )


def _choice(field: str, value: Any, finish: str | None) -> dict[str, Any]:
    """One choice of a body or chunk: its `field` (message, delta or text), as vLLM
    orders the keys."""
    return {
        "index": 0,
        field: value,
        "logprobs": None,
        "finish_reason": finish,
        "stop_reason": None,
    }


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class ChunkWriter:
    """Builds the SSE events of one streamed chat or completions response."""

    def __init__(self, request_id: str, created: int, model: str, chat: bool) -> None:
        self._head = {
            "id": request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
        }
        self._chat = chat

    def role(self) -> bytes:
        """vLLM opens a chat stream with an empty assistant delta."""
        return self._event({"role": "assistant", "content": ""}, None)

    def token(self, token: str, finish: str | None) -> bytes:
        if self._chat:
            return self._event({"content": token}, finish)
        return self._event(token, finish)

    def usage(self, use: dict[str, int]) -> bytes:
        return sse(orjson.dumps({**self._head, "choices": [], "usage": use}))

    def _event(self, delta: dict[str, str] | str, finish: str | None) -> bytes:
        choice = _choice("delta" if self._chat else "text", delta, finish)
        return sse(orjson.dumps({**self._head, "choices": [choice]}))


def embedding_response(
    request_id: str,
    created: int,
    model: str,
    vectors: Sequence[Sequence[float]],
    as_base64: bool,
    prompt_tokens: int,
) -> bytes:
    data = [
        {
            "index": index,
            "object": "embedding",
            "embedding": text.embedding_base64(vector) if as_base64 else vector,
        }
        for index, vector in enumerate(vectors)
    ]
    return orjson.dumps(
        {
            "id": request_id,
            "object": "list",
            "created": created,
            "model": model,
            "data": data,
            "usage": usage(prompt_tokens, 0),
        }
    )


def models_response(
    models: Sequence[str], loras: Sequence[str], created: int, max_model_len: int
) -> bytes:
    base = models[0]
    data: list[dict[str, Any]] = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": base,
            "parent": None,
            "max_model_len": max_model_len,
        }
        for name in models
    ]
    data.extend(
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": name,
            "parent": base,
            "max_model_len": max_model_len,
        }
        for name in loras
    )
    return orjson.dumps({"object": "list", "data": data})
