"""The inference APIs the gateway routes, one module each: OpenAI chat completions,
completions and embeddings (`openai_chat`), OpenAI Responses (`openai_responses`) and
Anthropic Messages (`anthropic_messages`), as vLLM serves them.

`api_for(path)` says which API a request speaks; the session reads its body, answers its
errors and counts its usage through that `Api` (base.py), so a client always gets
refusals in the shape of the API it called.
"""

from __future__ import annotations

from gateway_extproc.apis import anthropic_messages, openai_responses
from gateway_extproc.apis.base import Api, UsageReader
from gateway_extproc.apis.openai_chat import OPENAI

API_BY_PATH: dict[str, Api] = {
    openai_responses.PATH: openai_responses.RESPONSES,
    anthropic_messages.PATH: anthropic_messages.MESSAGES,
}
# The paths this package adds to the OpenAI ones routed before (openai/requests.py).
PATHS = tuple(API_BY_PATH)

__all__ = ["API_BY_PATH", "OPENAI", "PATHS", "Api", "UsageReader", "api_for"]


def api_for(path: str) -> Api:
    """The API `path` (without its query) speaks; OpenAI's for every other path."""
    return API_BY_PATH.get(path, OPENAI)
