"""StrategyCatalog: strategy names (as the header and --default-strategy write them) to
Strategy objects, built once and shared by every request."""

from __future__ import annotations

from gateway_extproc.routing.base import Strategy
from gateway_extproc.routing.simple import RandomStrategy, RoundRobinStrategy


class StrategyCatalog:
    def __init__(self, strategies: list[Strategy] | None = None) -> None:
        chosen = strategies if strategies is not None else [RandomStrategy(), RoundRobinStrategy()]
        self._by_name: dict[str, Strategy] = {s.name: s for s in chosen}

    def resolve(self, name: str) -> Strategy | None:
        """The strategy for `name`, or None when the name means nothing."""
        return self._by_name.get(name.strip().lower())

    def names(self) -> list[str]:
        return sorted(self._by_name)
