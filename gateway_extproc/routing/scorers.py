"""The built-in scorers of engine metrics and load (the prefix-cache scorer is in
prefix.py).

Each follows `plugins.Scorer`: a score per candidate in 0..1, higher is better, or None
for "no data" (no fresh metrics, or the field this scorer needs is unknown); NaN,
infinite and negative inputs count as no data. Each also declares the fast paths its
scores allow (`fastpath`), which is why some carry more than `score`.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Callable
from itertools import chain, compress, repeat
from operator import gt, is_not, truediv
from typing import cast

from gateway_extproc.metrics.store import PodMetrics
from gateway_extproc.routing.fastpath import Affine, Lowering, Partial, PerScrape
from gateway_extproc.routing.plugins import Scorer, Scores, ScoringContext
from gateway_extproc.routing.signals import LoadBook, worth_updating

_INF = math.inf


def lower_is_better(values: list[float | None]) -> Scores:
    """Min-max normalise so the lowest value scores 1 and the highest 0; all equal -> 1."""
    present = [v for v in values if v is not None]
    if not present:
        return [None] * len(values)
    lo = min(present)
    span = max(present) - lo
    if span <= 0.0:
        return [None if v is None else 1.0 for v in values]
    return [None if v is None else (lo + span - v) / span for v in values]


class QueueScorer(Scorer, Partial, Affine):
    """Fewest requests ahead: the pod's load (`signals.LoadBook`): our in-flight count,
    the engine's requests beyond it at its last scrape (other replicas'), and its waiting
    queue.

    Always has data (the in-flight count is our own), so it is also the tie-breaker;
    without fresh metrics the engine's counts are unknown, so such a pick is a fallback.
    """

    name = "least-request"
    partial_without_metrics = True

    def score(self, ctx: ScoringContext) -> Scores:
        loads = ctx.loads()
        lo, span = ctx.spread()
        if span == 0:
            return [1.0] * len(loads)
        by_load = self.by_load(ctx)
        if by_load is not None:
            return list(map(by_load.__getitem__, loads))
        hi = lo + span
        inv = 1.0 / span
        return [(hi - x) * inv for x in loads]

    def by_load(self, ctx: ScoringContext) -> list[float] | None:
        """The score of each load value, indexed by load, or None when the highest load
        is above the number of candidates (then a table would not pay for itself).
        Loads are small counts, so a C-level lookup per pod replaces the arithmetic."""
        lo, span = ctx.spread()
        hi = lo + span
        if lo < 0 or hi > len(ctx.candidates.keys):
            return None
        if span == 0:
            return [1.0] * (hi + 1)
        inv = 1.0 / span
        return [(hi - x) * inv for x in range(hi + 1)]

    def score_at(self, ctx: ScoringContext, positions: list[int]) -> list[float]:
        """`score(ctx)` at these positions only: for a tie-break among a few pods, or
        the few a ranking could not rule out, it spares a pass over every candidate."""
        loads = ctx.loads()
        lo, span = ctx.spread()
        if span == 0:
            return [1.0] * len(positions)
        hi = lo + span
        inv = 1.0 / span
        return [(hi - loads[i]) * inv for i in positions]

    def affine(self, ctx: ScoringContext) -> tuple[int, float] | None:
        """(hi, inv) such that a pod's score is exactly (hi - its load) * inv, or None
        when every score is 1.0: lets the picker fold this score into a single pass."""
        lo, span = ctx.spread()
        if span == 0:
            return None
        return lo + span, 1.0 / span


class KVCacheScorer(Scorer, PerScrape):
    """Most free KV cache: 1 - kv_cache_usage, as an absolute fraction so that weights
    mean the same thing whatever the other pods show."""

    name = "least-kv-cache"

    def score(self, ctx: ScoringContext) -> Scores:
        # A copy: callers may edit it.
        return list(self.column(ctx))

    def column(self, ctx: ScoringContext) -> Scores:
        """Metrics only, so kept and updated pod by pod as scrapes land: shared, never
        change it."""
        return ctx.per_scrape(self, self._free, self._refree)

    @classmethod
    def _refree(cls, column: Scores, metrics: list[PodMetrics | None], at: list[int]) -> bool:
        for i, score in zip(at, cls._free([metrics[i] for i in at]), strict=True):
            column[i] = score
        return True

    @staticmethod
    def _free(metrics: list[PodMetrics | None]) -> Scores:
        # Inline checks (NaN fails every comparison): no Python call per pod.
        return [
            None
            if m is None or (u := m.kv_cache_usage) is None or not 0.0 <= u < _INF
            else (1.0 - u if u < 1.0 else 0.0)
            for m in metrics
        ]


class LatencyScorer(Scorer, Lowering):
    """Shortest expected time to first token.

    expected = recent mean TTFT + requests ahead x time for one slot to free up, where
    requests ahead is the larger of the engine's waiting queue and the requests on the pod
    (ours, corrected by the engine's counts: `signals.LoadBook`) beyond what the engine
    runs (so picks since the last scrape count at once), and a slot frees every e2e_mean /
    running seconds (recent TTFT when e2e is unknown). Scores are best / expected, so a
    pod twice as slow as the best scores 0.5.
    """

    name = "least-latency"
    # Keeps near-zero estimates from turning tiny absolute differences into large ratios.
    FLOOR_SECONDS = 0.001

    def score(self, ctx: ScoringContext) -> Scores:
        # The metric part of every estimate changes only with a scrape; per decision,
        # only pods whose load puts more requests ahead than their waiting queue (kept
        # from decision to decision) need their estimate redone.
        base = ctx.per_scrape(self, self._base, _LatencyBase.update)
        grown = self._grown(ctx, base)
        if not grown:
            return list(base.scores())
        best = base.best()
        if best is None or any(base.expected[i] == best for i in grown):
            expected = list(base.expected)
            for i, value in grown.items():
                expected[i] = value
            return _best_over(expected, not base.missing)
        # Estimates only grow past the limit, so the best one (not among these) stands
        # and only these pods' scores change.
        scores = list(base.scores())
        for i, value in grown.items():
            scores[i] = best / value
        return scores

    def near(self, ctx: ScoringContext, tolerance: float) -> list[int] | None:
        """The positions (ascending) whose score is within `tolerance` of the best one,
        as `score` would have them, without scoring every pod; None when some pod has no
        data. Every score is best / estimate, the best one exactly 1, and estimates only
        grow with load: so walking the per-scrape estimates upwards, the pods within
        tolerance come first, bar the few whose load grew theirs."""
        base = ctx.per_scrape(self, self._base, _LatencyBase.update)
        if base.missing:
            return None
        grown = self._grown(ctx, base)
        expected = cast("list[float]", base.expected)  # none missing
        order = base.ordered()
        best = min(grown.values(), default=_INF)
        for i in order:
            if i not in grown:
                best = min(best, expected[i])
                break
        cut = best / best - tolerance  # as the ranking has it: the best score minus that
        tied = [i for i, value in grown.items() if best / value >= cut]
        for i in order:
            if best / expected[i] < cut:
                break  # and so does every later pod
            if i not in grown:
                tied.append(i)
        tied.sort()
        return tied

    def _grown(self, ctx: ScoringContext, base: _LatencyBase) -> dict[int, float]:
        """Position -> estimate of the pods whose load puts more requests ahead than
        their waiting queue; every other estimate is the per-scrape one."""
        loads = ctx.loads()
        params = base.params
        floor = self.FLOOR_SECONDS
        grown: dict[int, float] = {}
        for i in base.over(ctx.book()):
            ttft, waiting, running, per_slot = params[i]  # type: ignore[misc]
            # Over its limit, the requests on the pod (its load less the waiting queue
            # the load adds) beyond what the engine runs are what is ahead (the larger
            # term of the max in the class docstring).
            grown[i] = ttft + (loads[i] - waiting - running) * per_slot + floor
        return grown

    def _base(self, metrics: list[PodMetrics | None]) -> _LatencyBase:
        return _LatencyBase(metrics, self.FLOOR_SECONDS)


_Inputs = tuple[float, int, int, float]


def _latency_inputs(
    m: PodMetrics | None, floor: float
) -> tuple[_Inputs | None, float | None, float]:
    """One pod's (ttft, waiting, running, per_slot), its estimate with only the waiting
    queue ahead, and the load beyond which that estimate grows; (None, None, inf) without
    data."""
    # Inline checks (NaN fails every comparison) rather than a helper call per value.
    if m is None or (ttft := m.ttft_mean_recent) is None or not 0.0 <= ttft < _INF:
        return None, None, _INF
    running = r if (r := m.running) is not None and 0 <= r < _INF else 0
    waiting = w if (w := m.waiting) is not None and 0 <= w < _INF else 0
    e2e = m.e2e_mean_recent
    if e2e is not None and 0.0 <= e2e < _INF:
        per_slot = e2e / (running if running > 1 else 1)
    else:
        per_slot = ttft
    # ahead = max(waiting, load - waiting - running, 0), where `load` is the requests on
    # the pod plus this same waiting queue: it is `waiting` until the load passes
    # 2 x waiting + running.
    return (
        (ttft, waiting, running, per_slot),
        ttft + waiting * per_slot + floor,
        2 * waiting + running,
    )


class _LatencyBase:
    """LatencyScorer's per-scrape part: per candidate, its inputs, its estimate with
    only the waiting queue ahead, and the load beyond which that estimate grows; how many
    have no estimate; and, built when first asked for and then kept, the positions by
    estimate and the scores best / estimate."""

    __slots__ = (
        "_order",
        "_over",
        "_over_book",
        "_over_mark",
        "_rechecks",
        "_scores",
        "expected",
        "floor",
        "limits",
        "missing",
        "params",
    )

    def __init__(self, metrics: list[PodMetrics | None], floor: float) -> None:
        self.floor = floor
        found = [_latency_inputs(m, floor) for m in metrics]
        self.params: list[_Inputs | None] = [f[0] for f in found]
        self.expected: list[float | None] = [f[1] for f in found]
        self.limits: list[float] = [f[2] for f in found]
        self.missing = self.expected.count(None)
        self._order: list[int] | None = None
        self._scores: Scores | None = None
        # `over`: the positions it found over their limit, the book (and the position in
        # its journal of moved loads) it looked at, and positions whose limit changed
        # since.
        self._over: set[int] = set()
        self._over_book: LoadBook | None = None
        self._over_mark = 0
        self._rechecks: list[int] = []

    def update(self, metrics: list[PodMetrics | None], at: list[int]) -> bool:
        """Take new metrics at these positions (always possible: True)."""
        expected, order = self.expected, self._order
        by_estimate = self._by_estimate()
        for i in at:
            was = expected[i]
            if was is None:
                self.missing -= 1
            elif order is not None:
                del order[order.index(i, bisect_left(order, was, key=by_estimate))]
            self.params[i], value, self.limits[i] = _latency_inputs(metrics[i], self.floor)
            expected[i] = value
            if value is None:
                self.missing += 1
            elif order is not None:
                insort(order, i, key=by_estimate)
        self._scores = None
        if self._over_book is not None:
            self._rechecks.extend(at)
        return True

    def over(self, book: LoadBook) -> set[int]:
        """Positions whose load in `book` is above their limit: kept, and looked at again
        only where a load or a limit changed (shared: never change it)."""
        loads, limits, over = book.loads, self.limits, self._over
        if book is self._over_book:
            moved = book.moved_since(self._over_mark)
            if moved is not None and worth_updating(len(moved) + len(self._rechecks), len(loads)):
                for i in chain(moved, self._rechecks):
                    if loads[i] > limits[i]:
                        over.add(i)
                    else:
                        over.discard(i)
                self._over_mark = book.moves()
                self._rechecks.clear()
                return over
        # In C: no Python call per pod.
        self._over = set(compress(range(len(loads)), map(gt, loads, limits)))
        self._over_book, self._over_mark = book, book.moves()
        self._rechecks.clear()
        return self._over

    def ordered(self) -> list[int]:
        """Positions of the pods with an estimate, lowest estimate first."""
        if self._order is None:
            expected = self.expected
            present = compress(range(len(expected)), map(is_not, expected, repeat(None)))
            self._order = sorted(present, key=self._by_estimate())
        return self._order

    def _by_estimate(self) -> Callable[[int], float]:
        """Position -> estimate, for the positions in the order (they have one)."""
        return cast("Callable[[int], float]", self.expected.__getitem__)

    def best(self) -> float | None:
        order = self.ordered()
        return self.expected[order[0]] if order else None

    def scores(self) -> Scores:
        """best / estimate per pod (None without one)."""
        if self._scores is None:
            self._scores = _best_over(self.expected, not self.missing)
        return self._scores


def _best_over(expected: list[float | None], complete: bool) -> Scores:
    """best / expected per pod (None stays None)."""
    if complete and expected:
        best = min(expected)  # type: ignore[type-var]
        return list(map(truediv, repeat(best), expected))  # type: ignore[arg-type]
    present = [v for v in expected if v is not None]
    if not present:
        return [None] * len(expected)
    best = min(present)
    return [None if v is None else best / v for v in expected]


class ThroughputScorer(Scorer, PerScrape):
    """Least busy by token throughput (prompt + generation tokens per second)."""

    name = "throughput"

    def score(self, ctx: ScoringContext) -> Scores:
        # A copy: callers may edit it.
        return list(self.column(ctx))

    def column(self, ctx: ScoringContext) -> Scores:
        """Metrics only, so kept and updated pod by pod as scrapes land: shared, never
        change it."""
        return ctx.per_scrape(self, self._busy, _LowerIsBetter.update).scores

    @staticmethod
    def _busy(metrics: list[PodMetrics | None]) -> _LowerIsBetter:
        return _LowerIsBetter(list(map(_tokens_per_second, metrics)))


def _tokens_per_second(m: PodMetrics | None) -> float | None:
    if m is None or (t := m.tokens_per_second) is None or not 0.0 <= t < _INF:
        return None
    return t


class _LowerIsBetter:
    """`lower_is_better(values)`, kept with the values so that a pod whose new value
    stays strictly between the lowest and the highest changes its own score only."""

    __slots__ = ("hi", "lo", "scores", "values")

    def __init__(self, values: list[float | None]) -> None:
        self.values = values
        present = [v for v in values if v is not None]
        self.lo = min(present) if present else None
        self.hi = max(present) if present else None
        self.scores = lower_is_better(values)

    def update(self, metrics: list[PodMetrics | None], at: list[int]) -> bool:
        lo, hi, values = self.lo, self.hi, self.values
        if lo is None or hi is None or not lo < hi:
            return False
        new = [_tokens_per_second(metrics[i]) for i in at]
        for i, value in zip(at, new, strict=True):
            for v in (values[i], value):
                if v is not None and not lo < v < hi:
                    return False  # the range may move, and every score with it
        span = hi - lo
        scores = self.scores
        for i, value in zip(at, new, strict=True):
            values[i] = value
            # lower_is_better's arithmetic, so the floats are the same.
            scores[i] = None if value is None else (lo + span - value) / span
        return True
