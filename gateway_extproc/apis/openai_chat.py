"""OpenAI chat completions, completions and embeddings: the API the gateway started with.

Usage is `usage.prompt_tokens` / `usage.completion_tokens`, in the whole body or, when
the request asked for it, in a last streamed chunk with no choices; `data: [DONE]` ends
a stream. Errors are OpenAI's error body.
"""

from __future__ import annotations

from typing import Any

from gateway_extproc.apis.base import Api
from gateway_extproc.openai.errors import body_of
from gateway_extproc.openai.sse import DONE
from gateway_extproc.openai.usage import Usage, usage_of, usage_of_event


class ChatUsage:
    __slots__ = ("ended", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.ended = False

    def read_body(self, doc: Any) -> None:
        self.usage = usage_of(doc)

    def read_event(self, data: bytes) -> bool:
        if data == DONE:
            self.ended = True
            return False
        usage = usage_of_event(data)
        if usage is None:
            return True
        self.usage = usage
        return False  # the usage chunk carries no token


OPENAI = Api("openai", ChatUsage, body_of, usage_on_request=True)
