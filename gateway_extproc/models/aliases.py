"""Model aliases: a name clients use that maps to weighted target models (a traffic
split, `llama-3 -> {llama-3-8b-v2: 90, llama-3-8b-v3: 10}`).

A request for an alias goes to one of its targets; the session rewrites the body's
`model` to it. Targets are chosen by smooth weighted round robin, so the split holds to
the weights over every run of requests as long as their sum, not just on average, and
stays interleaved (a 90/10 split sends one request in ten to v3, not ten in a row).
Targets the dictionary does not know are skipped; when none of them is ready, the ones
that exist are still chosen (and the request gets their 503); when none exists the alias
is unknown (404).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway_extproc import errors
from gateway_extproc.models.registry import ModelRegistry, ModelState


@dataclass(eq=False)
class Alias:
    name: str
    targets: tuple[tuple[str, int], ...]  # (model, weight), weights >= 0, not all 0
    # Smooth weighted round robin: each pick adds every eligible target's weight to its
    # credit, takes the target with the most, and charges it the eligible weights' sum.
    _credit: dict[str, int] = field(default_factory=dict, repr=False)

    def pick(self, registry: ModelRegistry) -> str:
        """The target this request goes to; GatewayError 404 if no target exists."""
        states = [(model, weight, registry.lookup(model).state) for model, weight in self.targets]
        eligible = [(m, w) for m, w, state in states if w and state is ModelState.READY]
        if not eligible:
            eligible = [(m, w) for m, w, state in states if w and state is not ModelState.ABSENT]
        if not eligible:
            raise errors.model_not_found(self.name)
        return self._next(eligible)

    def _next(self, eligible: Iterable[tuple[str, int]]) -> str:
        credit = self._credit
        chosen, best, total = "", -1, 0
        for model, weight in eligible:
            value = credit.get(model, 0) + weight
            credit[model] = value
            total += weight
            if value > best:
                chosen, best = model, value
        credit[chosen] -= total
        return chosen
