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
# By `Api.name`: the routing answer names the request's API for a process that observes
# the response without having seen the request (extproc/handoff.py).
API_BY_NAME: dict[str, Api] = {api.name: api for api in (OPENAI, *API_BY_PATH.values())}

__all__ = [
    "API_BY_NAME",
    "API_BY_PATH",
    "OPENAI",
    "PATHS",
    "Api",
    "UsageReader",
    "api_for",
    "api_named",
]


def api_for(path: str) -> Api:
    """The API `path` (without its query) speaks; OpenAI's for every other path."""
    return API_BY_PATH.get(path, OPENAI)


def api_named(name: str) -> Api:
    """The API called `name`; OpenAI's for an unknown name (or none: a routing answer
    written by a processor older than the field)."""
    return API_BY_NAME.get(name, OPENAI)
