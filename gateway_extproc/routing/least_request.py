"""LeastRequestStrategy: the pod with the fewest requests ahead of a new one.

Load is our own in-flight count (taken at the moment of the pick, so a burst spreads at
once) plus the engine's waiting queue when its metrics are fresh. It follows the picker's
rules (pods in slow start take a small, growing random share; ties are broken at random)
but is written for speed: it is the default for large fleets, and with no pod in slow
start a pick reads the least loaded pods straight from the load book (`signals.LoadBook`),
with no pass over the candidates.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from itertools import chain, compress, islice, repeat
from operator import eq

from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.signals import PodSignals, probation_pick, weighted_choice

_FAR = float("inf")


class LeastRequestStrategy:
    def __init__(
        self, signals: PodSignals, rng: random.Random, *, name: str = "least-request"
    ) -> None:
        # `name` labels fallbacks; strategies that delegate here (session affinity) pass
        # their own so its counters say who asked.
        self.name = name
        self._signals = signals
        self._rng = rng

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]:
        n = len(candidates)
        if n <= 1:
            return list(candidates)
        signals = self._signals
        rng = self._rng
        now = signals.now()
        cs = signals.candidates(candidates)
        book = signals.book(cs, now)
        ramping = signals.ramping(cs, now)

        chosen = probation_pick(rng, ramping, n) if ramping else -1
        loads: list[float] | None = None
        if not ramping:
            # The pods at the lowest load, in position order, are kept by the book.
            tied = book.groups[min(book.groups)]
            chosen = tied[rng.randrange(len(tied))] if len(tied) > 1 else tied[0]
        elif chosen < 0:
            loads = list(book.loads)
            for i, _ in ramping:
                loads[i] = _FAR  # cold pods take only their share, never a tie
            low = min(loads)
            if low == _FAR:  # every candidate is in slow start
                chosen = weighted_choice(rng, ramping)
            else:
                ties = loads.count(low)
                if ties == 1:
                    chosen = loads.index(low)
                else:
                    # The k-th pod among the equally loaded, k at random: equal pods share.
                    # compress/islice find it in C, however many pods tie.
                    tied_at = compress(range(n), map(eq, loads, repeat(low)))
                    chosen = next(islice(tied_at, rng.randrange(ties), None))

        store = signals.store
        if store is not None:
            key = cs.keys[chosen]
            if key not in signals.fresh(now):
                signals.fallback(self.name, key, signals.missing_reason(key, now), now)
        if count <= 1:
            return [candidates[chosen]]
        ahead = book.loads if loads is None else loads
        # Fallback endpoints: the next least loaded, scanning from a random start so
        # equal loads do not always favour the same pods.
        start = rng.randrange(n)
        order = (i for i in chain(range(start, n), range(start)) if i != chosen)
        rest = heapq.nsmallest(count - 1, order, key=ahead.__getitem__)
        return [candidates[chosen], *(candidates[i] for i in rest)]
