"""The built-in pickers: max-score, weighted-random, random and round-robin.

A picker is bound to its profile's weighted scorers when the profile is built and
chooses among the candidates the filters left. The scoring pickers degrade rather than
fail:

1. a pod's combined score is the weighted mean of its scorers' scores, or none when any
   scorer has no data for it;
2. pods without a combined score, and pods still in slow start, are *on probation*: each
   takes a random share of the traffic, its weight / number of candidates (a fair random
   share for a pod we cannot judge, a small but growing one for a cold pod), so they are
   neither skipped nor flooded;
3. then max-score takes the best combined score, ties going to the tie-breaker scorer
   (least request) and then to chance, so equal pods share the load; weighted-random
   draws in proportion to the scores;
4. when no pod has a score, the pick is random, weighted by slow start.

A pick made without the data the profile needed (a pod on probation, or, for a scorer
that scores on partial data, a pod without fresh metrics) is counted in
`gateway_routing_fallback_total{strategy,reason}` and warned about once per pod per
minute. Max-score's single picks take the shortcuts its scorers' capabilities allow
(`fastpath`), which pick exactly what the plain path below picks.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from itertools import compress, islice, repeat
from operator import ge

from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.fastpath import OUT, Partial, Shortcut, shortcut_for
from gateway_extproc.routing.plugins import (
    Picker,
    Scorer,
    Scores,
    ScoringContext,
    WeightedScorers,
    learns,
)
from gateway_extproc.routing.signals import PodSignals, probation_pick, weighted_choice

# Scores this close are equal: float noise must not decide between equal pods.
TIE = 1e-9
# Scores within this much of the best (scores run 0..1) compete as equals and the
# tie-break (least load) decides: metric estimates are only this good, and without it a
# pod whose recent TTFT is 1% lower would win every pick until the next scrape.
SCORE_TOLERANCE = 0.02


class _ScoringPicker(Picker):
    """What the scoring pickers share: the probation rule, pick notices and fallback
    accounting."""

    kind = "scoring"  # the registry name, for messages

    def __init__(
        self, name: str, weighted: WeightedScorers, signals: PodSignals, rng: random.Random
    ) -> None:
        if not len(weighted):
            raise ValueError(f"the {type(self).kind} picker needs at least one scorer")
        self.name = name  # the profile's: it labels fallbacks
        self.scorers = weighted
        self._signals = signals
        self._rng = rng
        self._learners = tuple(s for s in weighted.scorers if learns(s))
        self._partial_metrics = any(s.partial_without_metrics for s in weighted.scorers)

    def _probation(self, values: Scores, ctx: ScoringContext) -> dict[int, float]:
        """Position -> traffic weight of the pods on probation; marks them OUT in
        `values` (the caller's own list)."""
        probation: dict[int, float] = {}
        if None in values:
            probation = {i: 1.0 for i, s in enumerate(values) if s is None}
            for i in probation:
                values[i] = OUT
        for i, weight in self._signals.ramping(ctx.candidates, ctx.now):
            probation[i] = weight
            values[i] = OUT
        return probation

    def _learn(self, position: int, ctx: ScoringContext) -> None:
        for scorer in self._learners:
            scorer.picked(position, ctx)

    def _picked(self, position: int, ctx: ScoringContext, unscored: bool) -> None:
        """Tell the scorers that learn, and count a pick made without the data needed
        (a single candidate is no choice, so never a fallback)."""
        for scorer in self._learners:
            scorer.picked(position, ctx)
        signals = self._signals
        if unscored or (
            self._partial_metrics
            and signals.store is not None
            and ctx.metrics()[position] is None  # the view this decision brought current
        ):
            self._picked_partial(position, ctx)

    def _picked_partial(self, position: int, ctx: ScoringContext) -> None:
        """Count the pick of a pod scored without the data the profile needed."""
        signals = self._signals
        key = ctx.candidates.keys[position]
        signals.fallback(self.name, key, signals.missing_reason(key, ctx.now), ctx.now)


class MaxScorePicker(_ScoringPicker):
    """The best combined score; within `tolerance` of it, the tie-breaker's best; then
    one at random."""

    kind = "max-score"

    def __init__(
        self,
        name: str,
        weighted: WeightedScorers,
        signals: PodSignals,
        rng: random.Random,
        *,
        tiebreak: Scorer | None = None,
        tolerance: float = SCORE_TOLERANCE,
    ) -> None:
        super().__init__(name, weighted, signals, rng)
        if not 0.0 <= tolerance < 1.0:
            raise ValueError("tolerance must be in [0, 1)")
        self._tolerance = tolerance
        self._tiebreak = tiebreak
        self._tiebreak_at = tiebreak.score_at if isinstance(tiebreak, Partial) else None
        # When the tie-breaker is also one of several scorers, its column from the same
        # decision is reused rather than computed twice (a single column is the one the
        # ranking edits, so it cannot serve).
        self._tiebreak_column = next(
            (
                j
                for j, scorer in enumerate(weighted.scorers)
                if scorer is tiebreak and len(weighted) > 1
            ),
            -1,
        )
        # Looked at once, here: the fast path these scorers' capabilities allow.
        self.shortcut: Shortcut | None = shortcut_for(
            weighted,
            signals,
            rng,
            tolerance=tolerance,
            tiebreak=tiebreak,
            tiebreak_column=self._tiebreak_column,
            break_tie=self._break_tie,
        )

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]:
        n = len(candidates)
        if n == 0:
            return []
        signals = self._signals
        now = signals.now()
        ctx = ScoringContext(signals.candidates(candidates), request, now, signals)
        if n == 1:
            self._learn(0, ctx)
            return [candidates[0]]
        if count == 1 and self.shortcut is not None:
            chosen = self.shortcut.pick(ctx)
            if chosen >= 0:
                # `_picked(chosen, ctx, False)`, inlined: the common case, per decision.
                for scorer in self._learners:
                    scorer.picked(chosen, ctx)
                if (
                    self._partial_metrics
                    and signals.store is not None
                    and ctx.metrics()[chosen] is None
                ):
                    self._picked_partial(chosen, ctx)
                return [candidates[chosen]]

        columns = [scorer.score(ctx) for scorer in self.scorers.scorers]
        # Every scorer returns a new list per call, so this one is ours to edit.
        scores = self.scorers.combine(columns)
        probation = self._probation(scores, ctx)
        values: list[float] = scores  # type: ignore[assignment]

        rng = self._rng
        chosen = probation_pick(rng, probation.items(), n) if probation else -1
        best = max(values)
        unscored = chosen >= 0 or best == OUT
        if chosen < 0:
            if best == OUT:
                chosen = weighted_choice(rng, probation.items())
            else:
                chosen = self._best(values, best, ctx, columns)

        ranked = [candidates[chosen]]
        if count > 1:
            ranked.extend(self._rest(chosen, values, candidates, count))
        self._picked(chosen, ctx, unscored)
        return ranked

    def _best(
        self, values: list[float], best: float, ctx: ScoringContext, columns: list[Scores]
    ) -> int:
        # Positions within the tolerance of the best, found by C-level passes.
        cut = best - self._tolerance
        tied = list(compress(range(len(values)), map(ge, values, repeat(cut))))
        j = self._tiebreak_column
        if j >= 0 and len(tied) > 1:
            return self._break_tie(tied, ctx, list(map(columns[j].__getitem__, tied)))
        return self._break_tie(tied, ctx, None)

    def _break_tie(self, tied: list[int], ctx: ScoringContext, found: Scores | None) -> int:
        """Among positions tied on score: the best by the tie-breaker (its scores at
        `tied` are `found` when the caller has them), then one at random."""
        if len(tied) > 1 and self._tiebreak is not None:
            if found is None:
                if self._tiebreak_at is not None:
                    found = self._tiebreak_at(ctx, tied)  # type: ignore[assignment]
                else:
                    found = list(map(self._tiebreak.score(ctx).__getitem__, tied))
            known = tied
            if None in found:  # type: ignore[operator]
                known = [i for i, e in zip(tied, found, strict=True) if e is not None]  # type: ignore[arg-type]
                found = [e for e in found if e is not None]  # type: ignore[union-attr]
            if known:
                top: float = max(found)  # type: ignore[type-var,assignment,arg-type]
                tied = list(compress(known, map(ge, found, repeat(top - TIE))))  # type: ignore[arg-type]
        return tied[self._rng.randrange(len(tied))] if len(tied) > 1 else tied[0]

    def _rest(
        self, chosen: int, values: list[float], candidates: Sequence[Pod], count: int
    ) -> list[Pod]:
        # Fallback endpoints: best scores first, pods on probation (OUT) last; shuffled
        # before the stable sort so that equal pods come in a different order each time.
        order = [i for i in range(len(values)) if i != chosen]
        self._rng.shuffle(order)
        return [candidates[i] for i in heapq.nlargest(count - 1, order, key=values.__getitem__)]


class WeightedRandomPicker(_ScoringPicker):
    """A pod at random, in proportion to its combined score (pods on probation take
    their share as with max-score; uniform when every score is 0). Spreads load where
    max-score would send a burst to the one best pod between two scrapes."""

    kind = "weighted-random"

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]:
        n = len(candidates)
        if n == 0:
            return []
        signals = self._signals
        ctx = ScoringContext(signals.candidates(candidates), request, signals.now(), signals)
        if n == 1:
            self._learn(0, ctx)
            return [candidates[0]]
        values: list[float] = self.scorers.combine(  # type: ignore[assignment]
            [scorer.score(ctx) for scorer in self.scorers.scorers]
        )
        probation = self._probation(values, ctx)  # type: ignore[arg-type]
        rng = self._rng
        chosen = probation_pick(rng, probation.items(), n) if probation else -1
        unscored = chosen >= 0
        if chosen < 0:
            scored = [(i, v) for i, v in enumerate(values) if v != OUT]
            if not scored:
                chosen, unscored = weighted_choice(rng, probation.items()), True
            elif sum(v for _, v in scored) > 0.0:
                chosen = weighted_choice(rng, scored)
            else:
                chosen = scored[rng.randrange(len(scored))][0]
        ranked = [candidates[chosen]]
        if count > 1:
            # The others, drawn in proportion to their scores without replacement (a
            # random key u ** (1 / score) per pod, largest first); scoreless pods last.
            keys = {
                i: (rng.random() ** (1.0 / v) if v > 0.0 else -rng.random())
                for i, v in enumerate(values)
                if i != chosen
            }
            ranked.extend(
                candidates[i] for i in heapq.nlargest(count - 1, keys, key=keys.__getitem__)
            )
        self._picked(chosen, ctx, unscored)
        return ranked


class RandomPicker(Picker):
    """Uniformly at random: needs no scorer and no metrics."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]:
        if count == 1:
            return [candidates[self._rng.randrange(len(candidates))]] if candidates else []
        return self._rng.sample(list(candidates), min(count, len(candidates)))


class RoundRobinPicker(Picker):
    """Each model cycles through its candidates in their (stable, sorted) order."""

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
