"""Scoring a sample of a large candidate set.

The default profile's scorers (predicted TTFT, cache fit) cost a few microseconds per
candidate: fine for tens of pods, not for a thousand per decision. Over more than
`size` candidates, `SampledStrategy` lets its inner strategy rank a subset: the pods
that hold the longest part of the prompt's prefix (the decision's likely winners), some
of the least loaded, and a random draw from the rest. A random sample of a few dozen pods
holds a near-best one with high probability (the "power of d choices" of load
balancing); a slow pod drawn into it loses to the others there as it would in the whole
set, and new prompts are placed where they fit among the sampled pods.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest, Strategy
from gateway_extproc.routing.prefix_capacity import CachePressure
from gateway_extproc.routing.signals import PodSignals

# Candidates scored per decision on large fleets (all of them up to this many).
SAMPLE_SIZE = 16


class SampledStrategy:
    def __init__(
        self,
        inner: Strategy,
        pressure: CachePressure,
        signals: PodSignals,
        rng: random.Random,
        *,
        size: int = SAMPLE_SIZE,
    ) -> None:
        if size < 2:
            raise ValueError("a sample needs at least two pods")
        self.name = inner.name
        self.inner = inner
        # The router prepares the prompt's KV blocks when the ranking scorers read them.
        self.uses_tokens = bool(getattr(inner, "uses_tokens", False))
        self._pressure = pressure
        self._signals = signals
        self._rng = rng
        self._size = size

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]:
        n = len(candidates)
        size = max(self._size, count)
        if n <= size:
            return self.inner.rank(candidates, request, count)
        chosen = self.sample(candidates, request, size)
        return self.inner.rank(tuple(candidates[i] for i in sorted(chosen)), request, count)

    def sample(self, candidates: Sequence[Pod], request: RoutingRequest, size: int) -> set[int]:
        """Positions of up to `size` candidates: the deepest prefix holders (half at
        most), a quarter from the least loaded, the rest drawn at random."""
        signals = self._signals
        full = signals.candidates(candidates)
        positions = full.index
        chosen: set[int] = set()
        held = self._pressure.held_by(request)
        if held:
            deepest = sorted(held, key=held.__getitem__, reverse=True)[: size // 2]
            chosen.update(i for i in map(positions.get, deepest) if i is not None)
        book = signals.book(full, signals.now())
        idle = book.groups[min(book.groups)]
        if len(idle) > size // 4:
            idle = self._rng.sample(idle, size // 4)
        chosen.update(idle)
        rest = size - len(chosen)
        if rest > 0:
            # Drawn with repeats allowed and the chosen ones skipped: cheaper than a
            # draw without repeats over every position, and nearly as many pods.
            draw = self._rng.randrange
            n = len(candidates)
            for _ in range(2 * rest):
                chosen.add(draw(n))
                if len(chosen) >= size:
                    break
        return chosen
