"""Scorers: each turns what is known of the candidate pods into a score per pod.

A score is in 0..1, higher is better, or None for "no data" (no fresh metrics, or the
field this scorer needs is unknown). A scorer scores the whole candidate list at once so a
decision costs one call per scorer, not one per pod. NaN, infinite and negative inputs
count as no data. The picker (`picker.ScoredStrategy`) combines scores by weight; this
follows the Gateway API Inference Extension's split into filters, scorers and pickers.
"""

from __future__ import annotations

import math
from typing import Protocol

from gateway_extproc.metrics.store import PodMetrics
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.signals import CandidateSet, PodSignals

Scores = list[float | None]
_INF = math.inf


class ScoringContext:
    """One routing decision: the candidates and what is known of them, computed lazily
    and at most once however many scorers ask."""

    __slots__ = ("_loads", "_metrics", "candidates", "now", "prefix_hashes", "request", "signals")

    def __init__(
        self, candidates: CandidateSet, request: RoutingRequest, now: float, signals: PodSignals
    ) -> None:
        self.candidates = candidates
        self.request = request
        self.now = now
        self.signals = signals
        self._metrics: list[PodMetrics | None] | None = None
        self._loads: list[int] | None = None
        # The prompt's block hashes, computed by the prefix scorer and reused when the
        # pick is recorded.
        self.prefix_hashes: list[int] | None = None

    def metrics(self) -> list[PodMetrics | None]:
        """Fresh metrics per candidate (None when missing or stale)."""
        if self._metrics is None:
            fresh = self.signals.fresh(self.now)
            self._metrics = list(map(fresh.get, self.candidates.keys))
        return self._metrics

    def loads(self) -> list[int]:
        if self._loads is None:
            self._loads = self.signals.loads(self.candidates, self.now)
        return self._loads


class Scorer(Protocol):
    name: str

    def score(self, ctx: ScoringContext) -> Scores:
        """One score per candidate, in candidate order."""
        ...

    def picked(self, position: int, ctx: ScoringContext) -> None:
        """The pod at `position` was chosen (scorers that learn from picks record it)."""
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
        lo = min(loads)
        span = max(loads) - lo
        if span == 0:
            return [1.0] * len(loads)
        hi = lo + span
        inv = 1.0 / span
        return [(hi - x) * inv for x in loads]

    def picked(self, position: int, ctx: ScoringContext) -> None:
        return None


class KVCacheScorer:
    """Most free KV cache: 1 - kv_cache_usage, as an absolute fraction so that weights
    mean the same thing whatever the other pods show."""

    name = "least-kv-cache"

    def score(self, ctx: ScoringContext) -> Scores:
        # Inline checks (NaN fails every comparison): no Python call per pod.
        return [
            None
            if m is None or (u := m.kv_cache_usage) is None or not 0.0 <= u < _INF
            else (1.0 - u if u < 1.0 else 0.0)
            for m in ctx.metrics()
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
        metrics = ctx.metrics()
        loads = ctx.loads()
        expected: list[float | None] = []
        floor = self.FLOOR_SECONDS
        # Inline checks (NaN fails every comparison) rather than a helper call per pod.
        for m, load in zip(metrics, loads, strict=True):
            if m is None or (ttft := m.ttft_mean_recent) is None or not 0.0 <= ttft < _INF:
                expected.append(None)
                continue
            running = r if (r := m.running) is not None and 0 <= r < _INF else 0
            waiting = w if (w := m.waiting) is not None and 0 <= w < _INF else 0
            e2e = m.e2e_mean_recent
            # `load` is our in-flight count plus this same waiting queue.
            ahead = max(waiting, load - waiting - running, 0)
            if e2e is not None and 0.0 <= e2e < _INF:
                per_slot = e2e / (running if running > 1 else 1)
            else:
                per_slot = ttft
            expected.append(ttft + ahead * per_slot + floor)
        present = [v for v in expected if v is not None]
        if not present:
            return [None] * len(expected)
        best = min(present)
        return [None if v is None else best / v for v in expected]

    def picked(self, position: int, ctx: ScoringContext) -> None:
        return None


class ThroughputScorer:
    """Least busy by token throughput (prompt + generation tokens per second)."""

    name = "throughput"

    def score(self, ctx: ScoringContext) -> Scores:
        return lower_is_better(
            [
                None
                if m is None or (t := m.tokens_per_second) is None or not 0.0 <= t < _INF
                else t
                for m in ctx.metrics()
            ]
        )

    def picked(self, position: int, ctx: ScoringContext) -> None:
        return None
