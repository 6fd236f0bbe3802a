"""ScoredStrategy: combine weighted scorers into one ranking, degrading instead of failing.

Per decision:

1. every scorer scores every candidate; a pod's combined score is the weighted mean of
   its scores, or none when any scorer has no data for it;
2. pods without a combined score, and pods still in slow start, are *on probation*: each
   takes a random share of the traffic, its weight / number of candidates (a fair random
   share for a pod we cannot judge, a small but growing one for a cold pod), so they are
   neither skipped nor flooded;
3. otherwise the best combined score wins; ties go to the tie-breaker scorer (least
   request), then to chance, so equal pods share the load;
4. when no pod has a score, the pick is random, weighted by slow start.

A pick made without the data the strategy needed is counted in
`gateway_routing_fallback_total{strategy,reason}` and warned about once per pod per minute.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence

from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.scorers import Scorer, Scores, ScoringContext
from gateway_extproc.routing.signals import PodSignals, probation_pick, weighted_choice

# Scores this close are equal: float noise must not decide between equal pods.
TIE = 1e-9
# Scores within this much of the best (scores run 0..1) compete as equals and the
# tie-break (least load) decides: metric estimates are only this good, and without it a
# pod whose recent TTFT is 1% lower would win every pick until the next scrape.
SCORE_TOLERANCE = 0.02
# Below every real score (0..1): marks pods that do not compete on score.
_OUT = -1.0


class ScoredStrategy:
    def __init__(
        self,
        name: str,
        scorers: Sequence[tuple[Scorer, float]],
        signals: PodSignals,
        rng: random.Random,
        *,
        tiebreak: Scorer | None = None,
    ) -> None:
        if not scorers or any(w <= 0 for _, w in scorers):
            raise ValueError("a scored strategy needs scorers with positive weights")
        self.name = name
        self.scorers = tuple(scorers)
        self._weights = tuple(w for _, w in scorers)
        self._total_weight = sum(self._weights)
        self._signals = signals
        self._rng = rng
        self._tiebreak = tiebreak

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]:
        n = len(candidates)
        if n == 0:
            return []
        signals = self._signals
        now = signals.now()
        ctx = ScoringContext(signals.candidates(candidates), request, now, signals)
        if n == 1:
            self._picked(0, ctx)
            return [candidates[0]]

        # Combined score per pod; _OUT marks pods that do not compete on score.
        scores = self._combine([scorer.score(ctx) for scorer, _ in self.scorers])
        # position -> traffic weight of pods on probation
        probation: dict[int, float] = {}
        if None in scores:
            probation = {i: 1.0 for i, s in enumerate(scores) if s is None}
            scores = [_OUT if s is None else s for s in scores]
        # Every scorer returns a new list per call, so this one is ours to edit.
        values: list[float] = scores  # type: ignore[assignment]
        for i, weight in signals.ramping(ctx.candidates, now):
            probation[i] = weight
            values[i] = _OUT

        rng = self._rng
        chosen = probation_pick(rng, probation.items(), n) if probation else -1
        best = max(values)
        unscored_pick = chosen >= 0 or best == _OUT
        if chosen < 0:
            if best == _OUT:
                chosen = weighted_choice(rng, probation.items())
            else:
                chosen = self._best(values, best, ctx)

        ranked = [candidates[chosen]]
        if count > 1:
            ranked.extend(self._rest(chosen, values, candidates, count))
        self._picked(chosen, ctx)
        if unscored_pick:
            key = ctx.candidates.keys[chosen]
            signals.fallback(self.name, key, signals.missing_reason(key, now), now)
        return ranked

    def _combine(self, columns: list[Scores]) -> Scores:
        """Weighted mean per pod, None when any scorer has no data for it; one list pass
        per scorer rather than a Python loop over scorers per pod."""
        if len(columns) == 1:
            return columns[0]
        total = self._total_weight
        first = self._weights[0] / total
        out: Scores = [None if s is None else first * s for s in columns[0]]
        for column, weight in zip(columns[1:], self._weights[1:], strict=True):
            w = weight / total
            out = [
                None if a is None or b is None else a + w * b
                for a, b in zip(out, column, strict=True)
            ]
        return out

    def _best(self, values: list[float], best: float, ctx: ScoringContext) -> int:
        cut = best - SCORE_TOLERANCE
        tied = [i for i, v in enumerate(values) if v >= cut]
        if len(tied) > 1 and self._tiebreak is not None:
            extra = self._tiebreak.score(ctx)
            known = [i for i in tied if extra[i] is not None]
            if known:
                top = max(extra[i] for i in known)  # type: ignore[type-var]
                tied = [i for i in known if extra[i] >= top - TIE]  # type: ignore[operator]
        return tied[self._rng.randrange(len(tied))] if len(tied) > 1 else tied[0]

    def _rest(
        self, chosen: int, values: list[float], candidates: Sequence[Pod], count: int
    ) -> list[Pod]:
        # Fallback endpoints: best scores first, pods on probation (OUT) last; shuffled
        # before the stable sort so that equal pods come in a different order each time.
        order = [i for i in range(len(values)) if i != chosen]
        self._rng.shuffle(order)
        return [candidates[i] for i in heapq.nlargest(count - 1, order, key=values.__getitem__)]

    def _picked(self, position: int, ctx: ScoringContext) -> None:
        for scorer, _ in self.scorers:
            scorer.picked(position, ctx)
