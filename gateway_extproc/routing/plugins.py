"""The routing plugin contracts: filters, scorers and pickers, and what they are given.

A strategy is a profile (`profile.Profile`): filters drop candidates, weighted scorers
score the rest, a picker chooses. This is the split the Gateway API Inference
Extension's scheduler made standard, in Python terms:

- `Filter.filter(candidates, request)` returns the candidates it keeps;
- `Scorer.score(ctx)` gives each candidate a score in 0..1 (higher is better) or None
  for "no data about this pod";
- a `Picker` is bound to its profile's weighted scorers when the profile is built and
  drives them per decision. Binding at build time is what lets the max-score picker use
  the fast paths its scorers declare (`fastpath`) instead of scoring every pod.

Plugins are made by factories registered by name (`registry`); a factory is given a
`PluginEnv` (the shared signals, the random source, the shared scorer instances) and the
profile's parameters for it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from gateway_extproc.metrics.store import PodMetrics
from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.measured import ResponseTiming
from gateway_extproc.routing.signals import CandidateSet, LoadBook, PodSignals, ScrapeView

T = TypeVar("T")

Scores = list[float | None]


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
        """Fresh metrics per candidate (None when missing or stale); shared and updated
        in place as scrapes land, so read it within this decision only, never change it."""
        return self.view().metrics

    def per_scrape(
        self,
        owner: object,
        build: Callable[[list[PodMetrics | None]], T],
        update: Callable[[T, list[PodMetrics | None], list[int]], bool] | None = None,
    ) -> T:
        """`build(metrics())`, kept under `owner` (a scorer) for this candidate set: the
        metric-only part of a score, shared by every decision. Once scrapes have landed
        it is brought up to date by `update(value, metrics(), positions)` when given,
        which changes `value` in place at the positions whose metrics changed (and may
        touch others) and says True, or says False to have it built again; without
        `update`, or when too many pods changed, it is built again. Never change what it
        returns."""
        view = self.view()
        derived = view.derived
        found = derived.get(owner)
        if found is not None:
            value: T = found[0]
            if found[1] == view.version:
                return value
            if update is not None and value is not None:
                positions = view.positions_since(found[1])
                if positions is not None and update(value, view.metrics, positions):
                    derived[owner] = (value, view.version)
                    return value
        value = build(view.metrics)
        derived[owner] = (value, view.version)
        return value

    def loads(self) -> list[int]:
        """Load per candidate: shared and kept current between decisions, so read it
        within this decision only, never change it."""
        if self._loads is None:
            self._loads = self.book().loads
        return self._loads

    def book(self) -> LoadBook:
        if self._book is None:
            self._book = self.signals.book(self.candidates, self.now)
            if self._view is None:
                # The book brought the scrape view current on its way: no second look.
                self._view = self._book.view
        return self._book

    def spread(self) -> tuple[int, int]:
        """(lowest load, highest - lowest), for the scorers that normalise loads."""
        if self._spread is None:
            self._spread = self.book().spread()
        return self._spread


class Filter:
    """Drops candidates that must not be picked for this request."""

    name: str = "filter"
    # Completes "The model `m` has no ready pod..." when the filter keeps none; the
    # default names the filter.
    detail: str = ""
    # True for a preference rather than a rule (e.g. "not saturated"): when it would
    # keep no pod, it keeps them all instead of failing the request.
    fail_open: bool = False

    def filter(self, candidates: Sequence[Pod], request: RoutingRequest) -> Sequence[Pod]:
        """The candidates kept, in their order. Return `candidates` itself when keeping
        them all: what routing keeps per candidate set is found by the sequence's
        identity, so a new tuple per request costs a rebuild."""
        raise NotImplementedError

    def empty_detail(self) -> str:
        return self.detail or f" passing the {self.name} filter"


class Scorer:
    """Scores every candidate of a decision at once: one call per scorer, not per pod.

    A score is in 0..1, higher is better, or None for "no data about this pod" (no fresh
    metrics, or the field this scorer needs is unknown); such pods take a fair random
    share rather than being skipped or preferred. A scorer may also declare fast paths
    (`fastpath`); one that declares none is scored in full every decision, correctly.
    """

    name: str = "scorer"
    # True when the scorer still scores a pod whose engine metrics are missing or stale,
    # from what is left (least-request: our in-flight count without the engine's queue):
    # a pick of such a pod then counts as a fallback (gateway_routing_fallback_total).
    partial_without_metrics: ClassVar[bool] = False
    # True when the scorer reads `ctx.request.blocks`, the prompt cut into the engines'
    # KV blocks: the router then prepares them before ranking (prompt_blocks.py).
    uses_tokens: ClassVar[bool] = False

    def score(self, ctx: ScoringContext) -> Scores:
        """One score per candidate, in candidate order: a new list, the caller's to
        change."""
        raise NotImplementedError

    def picked(self, position: int, ctx: ScoringContext) -> None:
        """The pod at `position` was chosen (scorers that learn from picks record it)."""
        return None


def learns(scorer: Scorer) -> bool:
    """Whether the scorer wants to hear of picks (it overrides `picked`)."""
    return type(scorer).picked is not Scorer.picked


class Picker:
    """Chooses among the candidates, bound to its profile's weighted scorers (possibly
    none) when the profile is built."""

    def rank(self, candidates: Sequence[Pod], request: RoutingRequest, count: int) -> list[Pod]:
        """Up to `count` distinct candidates, the pick first; never empty when
        `candidates` is not, whatever data is missing."""
        raise NotImplementedError


class WeightedScorers:
    """A profile's scorers and their weights (> 0). A pod's combined score is the
    weighted mean of its scores, None when any scorer has no data for it."""

    __slots__ = ("normalised", "parts", "scorers", "total", "weights")

    def __init__(self, parts: Sequence[tuple[Scorer, float]]) -> None:
        if any(not weight > 0 for _, weight in parts):
            raise ValueError("scorer weights must be positive")
        self.parts = tuple(parts)
        self.scorers = tuple(s for s, _ in parts)
        self.weights = tuple(w for _, w in parts)
        self.total = sum(self.weights)
        self.normalised = tuple(w / self.total for w in self.weights)

    def __len__(self) -> int:
        return len(self.parts)

    def __iter__(self) -> Iterator[tuple[Scorer, float]]:
        return iter(self.parts)

    def __getitem__(self, i: int) -> tuple[Scorer, float]:
        return self.parts[i]

    def combine(self, columns: list[Scores]) -> Scores:
        """Weighted mean per pod of the scorers' columns: one fused pass for two or three
        scorers (the sums are evaluated in the same order as the general loop, so the
        floats are the same), else one list pass per scorer."""
        if len(columns) == 1:
            return columns[0]
        total = self.total
        w = [weight / total for weight in self.weights]
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

    def weighted_sum(self, terms: list[float]) -> float:
        """One pod's combined score, with `combine`'s order of operations."""
        total = self.total
        out = self.weights[0] / total * terms[0]
        for term, weight in zip(terms[1:], self.weights[1:], strict=True):
            out = out + weight / total * term
        return out


class PluginEnv:
    """What plugin factories are given: the signals every plugin shares, the random
    source (seeded by --routing-seed), and the shared scorer instances.

    Scorers are built once per name and parameters and shared by every profile that
    uses them, so what one keeps per candidate set (per-scrape columns, the prefix
    index) serves them all.
    """

    def __init__(
        self,
        signals: PodSignals,
        rng: random.Random,
        make_scorer: Callable[[PluginEnv, str, Mapping[str, Any]], Scorer],
        shared: Mapping[Hashable, Any] | None = None,
    ) -> None:
        self.signals = signals
        self.rng = rng
        self._make_scorer = make_scorer
        self._scorers: dict[tuple[str, str], Scorer] = {}
        # Seeded with what the server owns and plugins may use (see `shared`).
        self._shared: dict[Hashable, Any] = dict(shared or {})
        self.forgetters: list[Callable[[str], None]] = []
        self.response_observers: list[Callable[[ResponseTiming], None]] = []

    def scorer(self, name: str, params: Mapping[str, Any] | None = None) -> Scorer:
        """The shared instance of scorer `name` with these parameters."""
        params = params or {}
        key = (name, repr(sorted(params.items())))
        found = self._scorers.get(key)
        if found is None:
            found = self._scorers[key] = self._make_scorer(self, name, params)
        return found

    def shared(self, key: Hashable, build: Callable[[], T]) -> T:
        """The object kept under `key`, built by `build()` the first time: state that
        several plugin instances share (one prefix index for every prefix scorer), or
        that the server made and handed to `build_catalog(shared=...)`."""
        if key not in self._shared:
            self._shared[key] = build()
        found: T = self._shared[key]
        return found

    def on_pod_removed(self, forget: Callable[[str], None]) -> None:
        """Have `forget(pod_key)` called when a pod is deleted, for plugins that keep
        something per pod."""
        self.forgetters.append(forget)

    def on_response(self, observe: Callable[[ResponseTiming], None]) -> None:
        """Have `observe(timing)` called when a routed response ends, for plugins that
        learn pod speeds from what the gateway measures (routing/measured.py)."""
        self.response_observers.append(observe)
