"""Scorers: each turns what is known of the candidate pods into a score per pod.

A score is in 0..1, higher is better, or None for "no data" (no fresh metrics, or the
field this scorer needs is unknown). A scorer scores the whole candidate list at once so a
decision costs one call per scorer, not one per pod. NaN, infinite and negative inputs
count as no data. The picker (`picker.ScoredStrategy`) combines scores by weight; this
follows the Gateway API Inference Extension's split into filters, scorers and pickers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import compress, repeat
from operator import gt, truediv
from typing import Protocol, TypeVar

from gateway_extproc.metrics.store import PodMetrics
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.signals import CandidateSet, LoadBook, PodSignals, ScrapeView

T = TypeVar("T")

Scores = list[float | None]
_INF = math.inf


class ScoringContext:
    """One routing decision: the candidates and what is known of them, computed lazily
    and at most once however many scorers ask."""

    __slots__ = (
        "_book",
        "_loads",
        "_spread",
        "_view",
        "candidates",
        "now",
        "prefix_hashes",
        "request",
        "signals",
    )

    def __init__(
        self, candidates: CandidateSet, request: RoutingRequest, now: float, signals: PodSignals
    ) -> None:
        self.candidates = candidates
        self.request = request
        self.now = now
        self.signals = signals
        self._view: ScrapeView | None = None
        self._book: LoadBook | None = None
        self._loads: list[int] | None = None
        self._spread: tuple[int, int] | None = None
        # The prompt's block hashes, computed by the prefix scorer and reused when the
        # pick is recorded.
        self.prefix_hashes: list[int] | None = None

    def view(self) -> ScrapeView:
        if self._view is None:
            self._view = self.signals.view(self.candidates, self.now)
        return self._view

    def metrics(self) -> list[PodMetrics | None]:
        """Fresh metrics per candidate (None when missing or stale); shared until the
        next scrape, so read it, never change it."""
        return self.view().metrics

    def per_scrape(self, owner: object, build: Callable[[list[PodMetrics | None]], T]) -> T:
        """`build(metrics())`, computed once per candidate set and store version and kept
        under `owner` (a scorer): the metric-only part of a score, shared by every
        decision until the next scrape. Never change what it returns."""
        derived = self.view().derived
        found: T | None = derived.get(owner)
        if found is None:
            found = derived[owner] = build(self.view().metrics)
        return found

    def loads(self) -> list[int]:
        """Load per candidate: shared and kept current between decisions, so read it
        within this decision only, never change it."""
        if self._loads is None:
            self._loads = self.book().loads
        return self._loads

    def book(self) -> LoadBook:
        if self._book is None:
            self._book = self.signals.book(self.candidates, self.now)
        return self._book

    def spread(self) -> tuple[int, int]:
        """(lowest load, highest - lowest), for the scorers that normalise loads."""
        if self._spread is None:
            self._spread = self.book().spread()
        return self._spread


class Scorer(Protocol):
    name: str

    def score(self, ctx: ScoringContext) -> Scores:
        """One score per candidate, in candidate order."""
        ...

    def picked(self, position: int, ctx: ScoringContext) -> None:
        """The pod at `position` was chosen (scorers that learn from picks record it)."""
        ...


class PerScrapeScorer(Protocol):
    """A scorer whose scores depend on engine metrics alone (not on the request or on
    in-flight counts), so one column serves every decision until the next scrape."""

    def column(self, ctx: ScoringContext) -> Scores:
        """The shared column: never change it."""
        ...


class PartialScorer(Protocol):
    """A scorer that can score some of the candidates only, and always has data."""

    def score_at(self, ctx: ScoringContext, positions: list[int]) -> list[float]:
        """Exactly `score(ctx)` at these positions, none of them None."""
        ...


class AffineScorer(Protocol):
    """A scorer whose score is an affine function of each pod's load."""

    def affine(self, ctx: ScoringContext) -> tuple[int, float] | None:
        """(hi, inv): score = (hi - load) * inv for every pod; None: all 1.0."""
        ...

    def by_load(self, ctx: ScoringContext) -> list[float] | None:
        """The same scores indexed by load, or None (then use `affine`)."""
        ...


class LoweringScorer(Protocol):
    """A scorer whose live inputs can only lower some scores below the per-scrape ones."""

    def moved(self, ctx: ScoringContext) -> tuple[Scores, dict[int, float]] | None:
        """(per-scrape column, position -> lowered score), or None: use `score`."""
        ...


class SparseScorer(Protocol):
    """A scorer that always has data and scores 0.0 but for a few pods."""

    def sparse(self, ctx: ScoringContext) -> dict[int, float]:
        """Position -> score of the pods that do not score 0.0."""
        ...


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


class QueueScorer:
    """Fewest requests ahead: our in-flight count plus the engine's waiting queue.

    Always has data (the in-flight count is our own), so it is also the tie-breaker.
    """

    name = "least-request"

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

    def picked(self, position: int, ctx: ScoringContext) -> None:
        return None


class KVCacheScorer:
    """Most free KV cache: 1 - kv_cache_usage, as an absolute fraction so that weights
    mean the same thing whatever the other pods show."""

    name = "least-kv-cache"

    def score(self, ctx: ScoringContext) -> Scores:
        # A copy: callers may edit it.
        return list(self.column(ctx))

    def column(self, ctx: ScoringContext) -> Scores:
        """Metrics only, so computed once per scrape and shared: never change it."""
        return ctx.per_scrape(self, self._free)

    @staticmethod
    def _free(metrics: list[PodMetrics | None]) -> Scores:
        # Inline checks (NaN fails every comparison): no Python call per pod.
        return [
            None
            if m is None or (u := m.kv_cache_usage) is None or not 0.0 <= u < _INF
            else (1.0 - u if u < 1.0 else 0.0)
            for m in metrics
        ]

    def picked(self, position: int, ctx: ScoringContext) -> None:
        return None


class LatencyScorer:
    """Shortest expected time to first token.

    expected = recent mean TTFT + requests ahead x time for one slot to free up, where
    requests ahead is the larger of the engine's waiting queue and our in-flight count
    beyond what the engine runs (so picks since the last scrape count at once), and a slot
    frees every e2e_mean / running seconds (recent TTFT when e2e is unknown). Scores are
    best / expected, so a pod twice as slow as the best scores 0.5.
    """

    name = "least-latency"
    # Keeps near-zero estimates from turning tiny absolute differences into large ratios.
    FLOOR_SECONDS = 0.001

    def score(self, ctx: ScoringContext) -> Scores:
        # The metric part of every estimate changes only with a scrape; per decision,
        # only pods whose load puts more requests ahead than their waiting queue (found
        # by one C-level pass) need their estimate redone.
        base = ctx.per_scrape(self, self._base)
        grown = self._grown(ctx, base)
        if not grown:
            return list(base.scores)
        best = base.best
        if best is None or any(base.expected[i] == best for i in grown):
            expected = list(base.expected)
            for i, value in grown.items():
                expected[i] = value
            return _best_over(expected, base.complete)
        # Estimates only grow past the limit, so the best one (not among these) stands
        # and only these pods' scores change.
        scores = list(base.scores)
        for i, value in grown.items():
            scores[i] = best / value
        return scores

    def moved(self, ctx: ScoringContext) -> tuple[Scores, dict[int, float]] | None:
        """This decision's scores as the per-scrape column (shared: never change it) and
        the positions whose score the live loads lowered, with their scores; None when
        the best estimate itself moved (then every score does: use `score`)."""
        base = ctx.per_scrape(self, self._base)
        grown = self._grown(ctx, base)
        if not grown:
            return base.scores, {}
        best = base.best
        if best is None or any(base.expected[i] == best for i in grown):
            return None
        return base.scores, {i: best / value for i, value in grown.items()}

    def _grown(self, ctx: ScoringContext, base: _LatencyBase) -> dict[int, float]:
        """Position -> estimate of the pods whose load puts more requests ahead than
        their waiting queue (found by one C-level pass); every other estimate is the
        per-scrape one."""
        loads = ctx.loads()
        over = compress(range(len(loads)), map(gt, loads, base.limits))
        params = base.params
        floor = self.FLOOR_SECONDS
        grown: dict[int, float] = {}
        for i in over:
            ttft, waiting, running, per_slot = params[i]  # type: ignore[misc]
            # Over its limit, our in-flight count beyond what the engine runs is what
            # is ahead (the larger term of the max in the class docstring).
            grown[i] = ttft + (loads[i] - waiting - running) * per_slot + floor
        return grown

    def _base(self, metrics: list[PodMetrics | None]) -> _LatencyBase:
        params: list[tuple[float, int, int, float] | None] = []
        expected: list[float | None] = []
        limits: list[float] = []
        floor = self.FLOOR_SECONDS
        # Inline checks (NaN fails every comparison) rather than a helper call per pod.
        for m in metrics:
            if m is None or (ttft := m.ttft_mean_recent) is None or not 0.0 <= ttft < _INF:
                params.append(None)
                expected.append(None)
                limits.append(_INF)
                continue
            running = r if (r := m.running) is not None and 0 <= r < _INF else 0
            waiting = w if (w := m.waiting) is not None and 0 <= w < _INF else 0
            e2e = m.e2e_mean_recent
            if e2e is not None and 0.0 <= e2e < _INF:
                per_slot = e2e / (running if running > 1 else 1)
            else:
                per_slot = ttft
            params.append((ttft, waiting, running, per_slot))
            # ahead = max(waiting, load - waiting - running, 0), where `load` is our
            # in-flight count plus this same waiting queue: it is `waiting` until the
            # load passes 2 x waiting + running.
            expected.append(ttft + waiting * per_slot + floor)
            limits.append(2 * waiting + running)
        return _LatencyBase(params, expected, limits)

    def picked(self, position: int, ctx: ScoringContext) -> None:
        return None


class _LatencyBase:
    """LatencyScorer's per-scrape part: per candidate, its inputs, its estimate with
    only the waiting queue ahead, and the load beyond which that estimate grows."""

    __slots__ = ("best", "complete", "expected", "limits", "params", "scores")

    def __init__(
        self,
        params: list[tuple[float, int, int, float] | None],
        expected: list[float | None],
        limits: list[float],
    ) -> None:
        self.params = params
        self.expected = expected
        self.limits = limits
        self.complete = None not in expected
        present = [v for v in expected if v is not None]
        self.best = min(present) if present else None
        self.scores = _best_over(expected, self.complete)


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


class ThroughputScorer:
    """Least busy by token throughput (prompt + generation tokens per second)."""

    name = "throughput"

    def score(self, ctx: ScoringContext) -> Scores:
        # A copy: callers may edit it.
        return list(self.column(ctx))

    def column(self, ctx: ScoringContext) -> Scores:
        """Metrics only, so computed once per scrape and shared: never change it."""
        return ctx.per_scrape(self, self._busy)

    @staticmethod
    def _busy(metrics: list[PodMetrics | None]) -> Scores:
        return lower_is_better(
            [
                None
                if m is None or (t := m.tokens_per_second) is None or not 0.0 <= t < _INF
                else t
                for m in metrics
            ]
        )

    def picked(self, position: int, ctx: ScoringContext) -> None:
        return None
