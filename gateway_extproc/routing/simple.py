"""Strategies that need no engine metrics: random and round-robin."""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import islice

from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest


class RandomStrategy:
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]:
        if count == 1:
            return [candidates[self._rng.randrange(len(candidates))]] if candidates else []
        return self._rng.sample(list(candidates), min(count, len(candidates)))


class RoundRobinStrategy:
    """Each model cycles through its routable pods in a stable (sorted) order."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]:
        n = len(candidates)
        if n == 0:
            return []
        start = self._next.get(request.model, 0) % n
        self._next[request.model] = start + 1
        order = (candidates[(start + i) % n] for i in range(n))
        return list(islice(order, min(count, n)))
