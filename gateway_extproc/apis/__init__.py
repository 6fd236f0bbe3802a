"""The inference APIs the gateway routes, one module each: OpenAI chat completions,
completions and embeddings (`openai_chat`), OpenAI Responses (`openai_responses`) and
Anthropic Messages (`anthropic_messages`), as vLLM serves them.

`api_for(path)` says which API a request speaks; the session reads its body, answers its
errors and counts its usage through that `Api` (base.py), so a client always gets
refusals in the shape of the API it called.

`RoutedPaths` is the allow-list of paths routed to a pod at all (`--allowed-paths`,
INFERENCE_PATHS by default): an engine serves more than inference on its port (vLLM's
/sleep and /reset_prefix_cache, every engine's /metrics), and none of that is the
gateway's clients' business.
"""

from __future__ import annotations

from gateway_extproc.apis import anthropic_messages, openai_responses
from gateway_extproc.apis.base import Api, UsageReader
from gateway_extproc.apis.openai_chat import OPENAI
from gateway_extproc.openai.requests import CHAT_PATH, COMPLETIONS_PATH, EMBEDDINGS_PATH

API_BY_PATH: dict[str, Api] = {
    openai_responses.PATH: openai_responses.RESPONSES,
    anthropic_messages.PATH: anthropic_messages.MESSAGES,
}
# The paths this package adds to the OpenAI ones routed before (openai/requests.py).
PATHS = tuple(API_BY_PATH)
# By `Api.name`: the routing answer names the request's API for a process that observes
# the response without having seen the request (extproc/handoff.py).
API_BY_NAME: dict[str, Api] = {api.name: api for api in (OPENAI, *API_BY_PATH.values())}

# Every path whose request and response the gateway understands: what is routed by default.
INFERENCE_PATHS = (CHAT_PATH, COMPLETIONS_PATH, EMBEDDINGS_PATH, *PATHS)

__all__ = [
    "API_BY_NAME",
    "API_BY_PATH",
    "INFERENCE_PATHS",
    "OPENAI",
    "PATHS",
    "Api",
    "RoutedPaths",
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


class RoutedPaths:
    """The paths routed to a pod: exact paths (without the query), and prefixes written
    with a trailing `*` (`/v1/audio/*`). Anything else is refused before routing."""

    __slots__ = ("_exact", "_prefixes")

    def __init__(self, patterns: tuple[str, ...] = INFERENCE_PATHS) -> None:
        self._exact = frozenset(p for p in patterns if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))

    def __contains__(self, path: str) -> bool:
        return path in self._exact or path.startswith(self._prefixes)
