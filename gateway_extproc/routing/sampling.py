"""The `sample` filter: on a large candidate set, the few pods worth scoring.

The default profile's scorers (predicted TTFT, cache fit) cost a few microseconds per
candidate: fine for tens of pods, not for a thousand per decision. Over more than `size`
candidates this filter keeps a subset: the pods that hold the longest part of the
prompt's prefix (the decision's likely winners: the engine's own report where its
KV-cache events are trusted, else the gateway's guess from what it sent where), some of
the least loaded, and a random draw from the rest. A random sample of a few dozen pods
holds a near-best one with high probability (the "power of d choices" of load
balancing); a slow pod drawn into it loses to the others there as it would in the whole
set, and new prompts are placed where they fit among the sampled pods. Up to `size`
candidates it keeps them all (the same sequence, so per-candidate-set state is reused).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.plugins import Filter
from gateway_extproc.routing.prefix_capacity import CachePressure
from gateway_extproc.routing.signals import PodSignals

# Candidates scored per decision on large fleets (all of them up to this many).
SAMPLE_SIZE = 16


class SampleFilter(Filter):
    name = "sample"
    # A sample is never empty while there are candidates; fail open all the same.
    fail_open = True

    def __init__(
        self,
        pressure: CachePressure,
        signals: PodSignals,
        rng: random.Random,
        *,
        events: KVBlockIndex | None = None,
        size: int = SAMPLE_SIZE,
    ) -> None:
        if size < 2:
            raise ValueError("a sample needs at least two pods")
        self._pressure = pressure
        self._signals = signals
        self._rng = rng
        self._events = events
        self.size = size

    def filter(self, candidates: Sequence[Pod], request: RoutingRequest) -> Sequence[Pod]:
        if len(candidates) <= self.size:
            return candidates
        chosen = self.sample(candidates, request, self.size)
        return tuple(candidates[i] for i in sorted(chosen))

    def sample(self, candidates: Sequence[Pod], request: RoutingRequest, size: int) -> set[int]:
        """Positions of up to `size` candidates: the deepest prefix holders (half at
        most), a quarter from the least loaded, the rest drawn at random."""
        signals = self._signals
        full = signals.candidates(candidates)
        positions = full.index
        chosen: set[int] = set()
        held = self._holders(full.keys, request)
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

    def _holders(self, keys: Sequence[str], request: RoutingRequest) -> dict[str, float]:
        """Pod key -> how much of the prompt's prefix it holds (a share, 0..1): the
        gateway's guess, then what the engines report where the request's blocks are
        known (the deepest of either counts)."""
        guessed = self._pressure.held_by(request)
        total = len(self._pressure.hashes_of(request)) or 1
        held = {key: depth / total for key, depth in guessed.items()}
        blocks, events = request.blocks, self._events
        if blocks is None or events is None:
            return held
        for size, chain in blocks.keys.items():
            blocks_total = blocks.totals.get(size, 0)
            if not chain or blocks_total <= 0:
                continue
            for key, depth in events.longest_prefixes(chain, keys).items():
                share = min(depth / blocks_total, 1.0)
                if share > held.get(key, 0.0) and events.trusted(key):
                    held[key] = share
        return held
