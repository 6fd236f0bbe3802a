"""What every strategy sees and promises."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway_extproc.models.registry import Pod


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """The parts of a request that strategies may use."""

    model: str
    request_id: str = ""
    prompt: str = ""
    session_id: str = ""
    user: str = ""


class Strategy(Protocol):
    """Ranks candidate pods for one request.

    `rank` returns up to `count` distinct pods from `candidates` (never empty when
    `candidates` is not), most preferred first. It must not fail for lack of data: a
    strategy that cannot score falls back to an order it can defend (random).
    """

    name: str

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]: ...
