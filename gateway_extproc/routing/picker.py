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

Shortcuts give the same pick, with the same random draws, for a single pick (no fallback
endpoints) when every pod has data and none is in slow start. When the last scorer is
the load term and the others are per-scrape or sparse (prefix cache), a pod's combined
score is a per-scrape partial sum plus a term of its load: pods at one load rank in an
order that only scrapes change, pod by pod, so only the leading pods of each load's
group are looked at (`_fused`: weighted combinations ending in least-request, and
least-kv-cache and throughput with their burst-spread term). Otherwise, when some
scorers change only with a scrape, bounds computed per scrape rule out the pods that
cannot come within SCORE_TOLERANCE of the best, and only the rest are scored
(`_shortlisted`). A single latency or prefix-cache scorer has its own (`_lowered`,
`_sparse_pick`). What these keep per candidate set is updated at the pods a scrape
changed (`ScoringContext.per_scrape`), not rebuilt per decision: on a large fleet a
scrape lands about as often as a request.

A pick made without the data the strategy needed is counted in
`gateway_routing_fallback_total{strategy,reason}` and warned about once per pod per minute.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from itertools import compress, repeat
from operator import add, ge
from typing import cast

from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.scorers import (
    AffineScorer,
    LoweringScorer,
    PartialScorer,
    PerScrapeScorer,
    Scorer,
    Scores,
    ScoringContext,
    SparseScorer,
)
from gateway_extproc.routing.signals import PodSignals, probation_pick, weighted_choice

# Scores this close are equal: float noise must not decide between equal pods.
TIE = 1e-9
# Scores within this much of the best (scores run 0..1) compete as equals and the
# tie-break (least load) decides: metric estimates are only this good, and without it a
# pod whose recent TTFT is 1% lower would win every pick until the next scrape.
SCORE_TOLERANCE = 0.02
# Below every real score (0..1): marks pods that do not compete on score.
_OUT = -1.0
# More distinct loads than this among the candidates, and `_fused` makes C-level passes
# over every pod rather than walk each load's group in Python.
_MAX_GROUPS = 48
# Above every score a scorer can return (1, give or take rounding): the upper bound used
# to rule pods out before scoring them.
_ABOVE_ONE = 1.0 + 1e-9


class _Shortlist:
    """Per scrape: the pods that can still come within SCORE_TOLERANCE of the best,
    whatever the live scorers say (None when some pod has no data: full ranking then),
    and the per-scrape scorers' columns at those positions."""

    __slots__ = ("columns", "positions")

    def __init__(self, positions: list[int] | None, columns: list[Scores | None]) -> None:
        self.positions = positions
        self.columns = columns


class _Fused:
    """Per candidate set, for `_fused`: each pod's weighted sum of every scorer but the
    last (sparse scorers at 0) and the columns it was summed from; once it has served a
    decision, also each position's sort key, (-sum, position): ascending keys put the
    pods best first, as a stable sort by sum would."""

    __slots__ = ("base", "columns", "decisions", "keys")

    def __init__(self, base: list[float], columns: list[Scores]) -> None:
        self.base = base
        self.columns = columns
        self.decisions = 0
        self.keys: list[tuple[float, int]] = []

    def ordered(self) -> list[tuple[float, int]]:
        if not self.keys:
            self.keys = [(-value, i) for i, value in enumerate(self.base)]
        return self.keys


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
        self._normalised = tuple(w / self._total_weight for w in self._weights)
        self._signals = signals
        self._rng = rng
        self._tiebreak = tiebreak
        # Scorers whose columns only change with a scrape, and the others when they can
        # score a few positions: then most pods can be ruled out once per scrape.
        self._per_scrape: tuple[PerScrapeScorer | None, ...] = tuple(
            cast("PerScrapeScorer", s) if hasattr(s, "column") else None for s, _ in self.scorers
        )
        self._partial: tuple[PartialScorer | None, ...] = tuple(
            cast("PartialScorer", s) if hasattr(s, "score_at") else None for s, _ in self.scorers
        )
        self._sparse: tuple[SparseScorer | None, ...] = tuple(
            cast("SparseScorer", s) if hasattr(s, "sparse") else None for s, _ in self.scorers
        )
        # When the last scorer is an affine function of load and the others are
        # per-scrape or sparse, the combined score is a per-scrape sum plus that term:
        # tried first, it looks at a few pods per load rather than at every pod.
        last = self.scorers[-1][0]
        self._affine = (
            cast("AffineScorer", last)
            if hasattr(last, "affine")
            and len(self.scorers) > 1
            and all(
                a is not None or b is not None
                for a, b in zip(self._per_scrape[:-1], self._sparse[:-1], strict=True)
            )
            else None
        )
        self._fused_key = object()
        # Or, for a single sparse scorer (prefix cache), only the pods it scores above 0.
        self._only_sparse = self._sparse[0] if len(self.scorers) == 1 else None
        # Or, for a single scorer that live inputs can only lower (latency), the pods it
        # finds within tolerance of the best.
        only = self.scorers[0][0]
        self._lowering = (
            cast("LoweringScorer", only)
            if len(self.scorers) == 1 and hasattr(only, "near")
            else None
        )
        self._prunable = any(self._per_scrape) and all(
            a is not None or b is not None
            for a, b in zip(self._per_scrape, self._partial, strict=True)
        )
        # When the tie-breaker is also one of several scorers, its column from the same
        # decision is reused rather than computed twice (a single column is the one the
        # ranking edits, so it cannot serve).
        self._tiebreak_column = next(
            (
                j
                for j, (scorer, _) in enumerate(self.scorers)
                if scorer is tiebreak and len(self.scorers) > 1
            ),
            -1,
        )

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
        if count == 1 and (self._prunable or self._affine or self._lowering or self._only_sparse):
            if self._affine is not None:
                chosen = self._fused(ctx)
            elif self._prunable:
                chosen = self._shortlisted(ctx)
            elif self._lowering is not None:
                chosen = self._lowered(ctx)
            else:
                chosen = self._sparse_pick(ctx)
            if chosen >= 0:
                self._picked(chosen, ctx)
                return [candidates[chosen]]

        # Combined score per pod; _OUT marks pods that do not compete on score.
        columns = [scorer.score(ctx) for scorer, _ in self.scorers]
        scores = self._combine(columns)
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
                chosen = self._best(values, best, ctx, columns)

        ranked = [candidates[chosen]]
        if count > 1:
            ranked.extend(self._rest(chosen, values, candidates, count))
        self._picked(chosen, ctx)
        if unscored_pick:
            key = ctx.candidates.keys[chosen]
            signals.fallback(self.name, key, signals.missing_reason(key, now), now)
        return ranked

    def _combine(self, columns: list[Scores]) -> Scores:
        """Weighted mean per pod, None when any scorer has no data for it: one fused pass
        for two or three scorers (the sums are evaluated in the same order as the
        general loop, so the floats are the same), else one list pass per scorer."""
        if len(columns) == 1:
            return columns[0]
        total = self._total_weight
        w = [weight / total for weight in self._weights]
        if len(columns) == 2:
            w1, w2 = w
            return [
                None if a is None or b is None else w1 * a + w2 * b
                for a, b in zip(columns[0], columns[1], strict=True)
            ]
        if len(columns) == 3:
            w1, w2, w3 = w
            return [
                None if a is None or b is None or c is None else w1 * a + w2 * b + w3 * c
                for a, b, c in zip(columns[0], columns[1], columns[2], strict=True)
            ]
        first = w[0]
        out: Scores = [None if s is None else first * s for s in columns[0]]
        for column, wk in zip(columns[1:], w[1:], strict=True):
            out = [
                None if a is None or b is None else a + wk * b
                for a, b in zip(out, column, strict=True)
            ]
        return out

    def _best(
        self, values: list[float], best: float, ctx: ScoringContext, columns: list[Scores]
    ) -> int:
        # Positions within the tolerance of the best, found by C-level passes.
        cut = best - SCORE_TOLERANCE
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
                score_at = getattr(self._tiebreak, "score_at", None)
                if score_at is not None:
                    found = score_at(ctx, tied)
                else:
                    found = list(map(self._tiebreak.score(ctx).__getitem__, tied))
            known = tied
            if None in found:
                known = [i for i, e in zip(tied, found, strict=True) if e is not None]
                found = [e for e in found if e is not None]
            if known:
                top: float = max(found)  # type: ignore[type-var,assignment]
                tied = list(compress(known, map(ge, found, repeat(top - TIE))))
        return tied[self._rng.randrange(len(tied))] if len(tied) > 1 else tied[0]

    def _shortlisted(self, ctx: ScoringContext) -> int:
        """The pick `rank` would make, scoring only the shortlist (-1: rank in full).

        Same scores, same tie-break, same draws from the RNG as the full ranking: every
        score is in 0..1, so a pod whose combined score with every live scorer at 1
        stays below (another pod's score with them at 0) - tolerance can neither be the
        best nor tie with it.
        """
        shortlist: _Shortlist = ctx.per_scrape(self, lambda _: self._shortlist(ctx))
        positions = shortlist.positions
        if positions is None or self._signals.ramping(ctx.candidates, ctx.now):
            return -1  # pods without data or on probation: the full ranking draws for them
        columns: list[Scores] = [
            column if column is not None else partial.score_at(ctx, positions)  # type: ignore[union-attr,misc]
            for column, partial in zip(shortlist.columns, self._partial, strict=True)
        ]
        values: list[float] = self._combine(columns)  # type: ignore[assignment]
        cut = max(values) - SCORE_TOLERANCE
        tied = [positions[k] for k in compress(range(len(values)), map(ge, values, repeat(cut)))]
        found: Scores | None = None
        j = self._tiebreak_column
        if j >= 0 and len(tied) > 1:
            per_scrape = self._per_scrape[j]
            if per_scrape is not None:
                found = list(map(per_scrape.column(ctx).__getitem__, tied))
            else:
                found = self._partial[j].score_at(ctx, tied)  # type: ignore[union-attr,assignment]
        return self._break_tie(tied, ctx, found)

    def _fused(self, ctx: ScoringContext) -> int:
        """The pick `rank` would make, without a pass over the candidates (-1: rank in
        full).

        Same floats as `_combine`: a pod's combined score is (its weighted sum of the
        other scorers, left to right) + w * ((hi - load) * inv), and that sum is
        per-scrape (`base`) for every pod but the few the sparse scorers score above 0.
        So pods at one load score in `base` order, which only scrapes change (a pod's
        key moves when its sum does): with the candidates grouped by load in that order
        (`LoadBook.grouped`), the best score is among the groups' heads, and the pods
        within tolerance of it are the leading run of each group.
        """
        fused: _Fused | None = ctx.per_scrape(
            self._fused_key,
            lambda _: self._fused_base(ctx),
            lambda found, _, at: self._fused_update(ctx, found, at),  # type: ignore[arg-type]
        )
        if fused is None or self._signals.ramping(ctx.candidates, ctx.now):
            return -1  # pods without data or on probation: the full ranking draws for them
        w = self._weights[-1] / self._total_weight
        affine = self._affine.affine(ctx)  # type: ignore[union-attr]
        fused.decisions += 1
        if fused.decisions == 1 or len(ctx.book().groups) > _MAX_GROUPS:
            # Ordering and grouping the pods cost a few passes: worth it only from the
            # second decision on these sums (they are rebuilt when many pods changed).
            return self._fused_pass(ctx, fused.base, w, affine)
        base = fused.base
        groups = ctx.book().grouped(self._fused_key, fused.ordered())
        if affine is None:
            terms = dict.fromkeys(groups, w * 1.0)
        else:
            hi, inv = affine
            terms = {load: w * ((hi - load) * inv) for load in groups}
        touched = self._touched(ctx, affine)
        best = max(touched.values(), default=_OUT)
        for load, keys in groups.items():
            for _, i in keys:
                if i not in touched:  # touched pods have their own score, counted above
                    best = max(best, base[i] + terms[load])
                    break
        cut = best - SCORE_TOLERANCE
        tied = [i for i, value in touched.items() if value >= cut]
        for load, keys in groups.items():
            term = terms[load]
            for _, i in keys:
                if base[i] + term < cut:
                    break  # and so is every later pod in this group
                if i not in touched:
                    tied.append(i)
        tied.sort()
        return self._break_tie(tied, ctx, None)

    def _fused_pass(
        self, ctx: ScoringContext, base: list[float], w: float, affine: tuple[int, float] | None
    ) -> int:
        """`_fused` in C-level passes over every candidate: cheaper on a scrape view's
        first decision, and when loads are so spread that there are more groups than a
        group walk can afford."""
        loads = ctx.loads()
        by_load = self._affine.by_load(ctx)  # type: ignore[union-attr]
        if by_load is not None:
            # w * score for each load value, then a C-level lookup and add per pod.
            term = [w * q for q in by_load]
            values = list(map(add, base, map(term.__getitem__, loads)))
        elif affine is None:
            values = [a + w * 1.0 for a in base]
        else:
            hi, inv = affine
            values = [a + w * ((hi - x) * inv) for a, x in zip(base, loads, strict=True)]
        for i, value in self._touched(ctx, affine).items():
            values[i] = value
        cut = max(values) - SCORE_TOLERANCE
        tied = list(compress(range(len(values)), map(ge, values, repeat(cut))))
        return self._break_tie(tied, ctx, None)

    def _touched(self, ctx: ScoringContext, affine: tuple[int, float] | None) -> dict[int, float]:
        """Position -> combined score of the pods some sparse scorer scores above 0."""
        touched: dict[int, None] = {}
        found: list[dict[int, float] | None] = []
        for sparse in self._sparse[:-1]:
            column = sparse.sparse(ctx) if sparse is not None else None
            found.append(column)
            if column:
                touched.update(dict.fromkeys(column))
        out: dict[int, float] = {}
        loads = ctx.loads()
        for i in touched:
            terms = [
                column.get(i, 0.0) if column is not None else per_scrape.column(ctx)[i]  # type: ignore[union-attr]
                for column, per_scrape in zip(found, self._per_scrape, strict=False)
            ]
            q = 1.0 if affine is None else (affine[0] - loads[i]) * affine[1]
            out[i] = self._weighted_sum([*terms, q])  # type: ignore[list-item]
        return out

    def _lowered(self, ctx: ScoringContext) -> int:
        """The pick `rank` would make, from the few pods the scorer finds within
        tolerance of the best without scoring every pod (-1: rank in full)."""
        if self._signals.ramping(ctx.candidates, ctx.now):
            return -1
        tied = self._lowering.near(ctx, SCORE_TOLERANCE)  # type: ignore[union-attr]
        if tied is None:
            return -1  # pods without data: the full ranking draws for them
        return self._break_tie(tied, ctx, None)

    def _sparse_pick(self, ctx: ScoringContext) -> int:
        """The pick `rank` would make when one sparse scorer scores every pod 0.0 but
        a few (-1: rank in full): only those few can beat the rest."""
        if self._signals.ramping(ctx.candidates, ctx.now):
            return -1
        scored = self._only_sparse.sparse(ctx)  # type: ignore[union-attr]
        cut = max(scored.values(), default=0.0) - SCORE_TOLERANCE
        if cut <= 0.0:  # 0.0 is within tolerance: every pod is tied
            tied = list(range(len(ctx.candidates.keys)))
        else:
            tied = sorted(i for i, score in scored.items() if score >= cut)
        return self._break_tie(tied, ctx, None)

    def _fused_base(self, ctx: ScoringContext) -> _Fused | None:
        """Per pod, the weighted sum of all scorers but the last, sparse ones at 0."""
        n = len(ctx.candidates.keys)
        zeros: Scores = [0.0] * n
        columns = [zeros if s is None else s.column(ctx) for s in self._per_scrape[:-1]]
        if any(None in c for c in columns):
            return None
        weights = self._normalised
        out: list[float] = [weights[0] * a for a in columns[0]]  # type: ignore[operator]
        for column, wk in zip(columns[1:], weights[1:], strict=False):
            out = [a + wk * b for a, b in zip(out, column, strict=True)]  # type: ignore[operator]
        return _Fused(out, columns)

    def _fused_update(self, ctx: ScoringContext, fused: _Fused, at: list[int]) -> bool:
        """Sum again at `at`, with `_fused_base`'s order of operations (same floats), and
        move those pods' keys; False when a column is a new list (many scores moved) or
        a pod lost data."""
        columns = fused.columns
        for s, column in zip(self._per_scrape[:-1], columns, strict=False):
            if s is not None and s.column(ctx) is not column:
                return False
        rows = [[column[i] for column in columns] for i in at]
        if any(None in row for row in rows):
            return False
        weights = self._normalised
        base, keys = fused.base, fused.keys
        book = ctx.book() if keys else None
        for i, row in zip(at, rows, strict=True):
            value = weights[0] * row[0]  # type: ignore[operator]
            for term, wk in zip(row[1:], weights[1:], strict=False):
                value = value + wk * term  # type: ignore[operator]
            base[i] = value
            if book is not None and keys[i][0] != -value:
                old, keys[i] = keys[i], (-value, i)
                book.rekey(self._fused_key, keys, i, old)
        return True

    def _weighted_sum(self, terms: list[float]) -> float:
        """One pod's combined score, with `_combine`'s order of operations."""
        total = self._total_weight
        out = self._weights[0] / total * terms[0]
        for term, weight in zip(terms[1:], self._weights[1:], strict=True):
            out = out + weight / total * term
        return out

    def _shortlist(self, ctx: ScoringContext) -> _Shortlist:
        columns = [s.column(ctx) if s is not None else None for s in self._per_scrape]
        if any(None in c for c in columns if c is not None):
            return _Shortlist(None, [])
        n = len(ctx.candidates.keys)
        # Bounds on each pod's combined score, computed as `_combine` computes it (same
        # order of operations, so rounding cannot break them).
        zeros: Scores = [0.0] * n
        ones: Scores = [_ABOVE_ONE] * n
        lower: list[float] = self._combine([zeros if c is None else c for c in columns])  # type: ignore[assignment]
        upper: list[float] = self._combine([ones if c is None else c for c in columns])  # type: ignore[assignment]
        cut = max(lower) - SCORE_TOLERANCE
        positions = list(compress(range(n), map(ge, upper, repeat(cut))))
        return _Shortlist(
            positions,
            [None if c is None else [c[i] for i in positions] for c in columns],
        )

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
