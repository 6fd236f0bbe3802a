"""What every strategy sees and promises."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway_extproc.models.registry import Pod


@dataclass(frozen=True, slots=True)
class PromptBlocks:
    """The prompt cut into the engines' KV blocks, under the gateway's block keys
    (kvevents/keys.py): per engine block size, the keys of its leading blocks (keying
    stops once no pod holds the prefix so far) and the number of blocks of the whole
    prompt (estimated when keying stopped early)."""

    keys: Mapping[int, Sequence[int]]
    totals: Mapping[int, int]


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """The parts of a request that strategies and their plugins may use.

    `document` is the parsed body and `endpoint` its path (for rendering the prompt as
    the engine will); `blocks` is filled in before ranking when a strategy asks for it
    and the model has a tokenizer (routing/prompt_blocks.py); `subset` holds the pod
    addresses the data plane asked us to pick inside (Envoy's subset hint)."""

    model: str
    request_id: str = ""
    prompt: str = ""
    session_id: str = ""
    user: str = ""
    document: Mapping[str, Any] | None = field(default=None, compare=False)
    endpoint: str = ""
    blocks: PromptBlocks | None = field(default=None, compare=False)
    subset: frozenset[str] | None = None


class Strategy(Protocol):
    """Ranks candidate pods for one request.

    `rank` returns up to `count` distinct pods from `candidates` (never empty when
    `candidates` is not), most preferred first. It must not fail for lack of data: a
    strategy that cannot score falls back to an order it can defend (random). It raises
    `NoCandidates` only when one of its filters leaves no pod to pick.
    """

    name: str

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]: ...


class NoCandidates(Exception):
    """A filter left no candidate: the client is told the model has no ready pod, with
    `detail` (" inside the requested endpoint subset") saying why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
