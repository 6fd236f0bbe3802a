"""PodSignals: what metrics-driven strategies know about candidate pods, built once and
shared by all of them.

It owns the pieces every such strategy needs and none should rebuild per request:

- `CandidateSet`: the pod keys of a candidate tuple, cached by the tuple's identity (the
  registry hands out the same tuple until the model changes), so a decision over 1,000
  pods does not rebuild 1,000 key strings;
- `ScrapeView`: the candidates' fresh metrics, waiting queues and loads beyond ours as
  vectors, with room for what scorers derive from them, updated at the pods whose
  metrics changed (a scrape recorded, metrics expired, a pod forgotten) rather than
  rebuilt: on a large fleet a scrape lands about as often as a request;
- `LoadBook`: load per pod, the one load every load-aware scorer reads (least-request,
  least-latency, predicted-ttft's queue term, the fast paths, sampling): the requests on
  the pod, plus its engine's waiting queue when fresh (a queued request waits for a
  slot, so it weighs twice). The requests on the pod are our own in-flight count (moved
  at the moment of the pick, so a burst spreads before any engine metric moves) plus the
  engine's requests beyond ours at its last fresh scrape (other replicas' requests,
  `MetricsStore.foreign`): the engine's running + waiting at the scrape, plus our picks
  and minus our releases since, never below our own count. So processors behind one
  Envoy see each other's load, one scrape late, and one alone routes as it did before
  replicas were counted. Kept current from the in-flight counter's journal and the
  scrapes, and grouped by load;
- slow start: pods routable without metrics yet take a weight that ramps from
  `min_weight` to 1 over `slow_start_window` (or until their metrics arrive);
- fallback accounting: `gateway_routing_fallback_total{strategy,reason}` and a warning at
  most once per pod per `warn_every` seconds.
"""

from __future__ import annotations

import random
import time
from bisect import bisect_left, insort
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from itertools import compress, count, repeat
from operator import add, ne
from typing import Any

import structlog

from gateway_extproc import telemetry
from gateway_extproc.metrics.store import MetricsStore, PodMetrics
from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.inflight import InFlightCounter

log = structlog.get_logger("gateway_extproc.routing")

FALLBACK_REASONS = ("no_metrics", "stale_metrics", "no_data")
# Moved loads a book remembers (at least): a reader further behind starts over.
MOVES_KEEP = 1024
_NO_METRICS: Mapping[str, Any] = {}


class ScrapeView:
    """What the store says of one candidate set, in candidate order, kept current.

    Engine metrics change one pod at a time (a scrape recorded, metrics expired, a pod
    forgotten), and on a large fleet about as often as decisions come: so the view is
    updated in place at the pods that changed, and whatever scorers derive from it
    (`derived`: owner -> (value, the store version it is current to)) is brought up to
    date the same way by its owner (`ScoringContext.per_scrape`), rather than rebuilt for
    every decision. When too many pods changed for that to pay, it is rebuilt instead.
    """

    __slots__ = (
        "_index",
        "_keys",
        "_store",
        "added",
        "derived",
        "metrics",
        "since",
        "version",
        "waiting",
    )

    def __init__(
        self,
        store: MetricsStore | None,
        version: int,
        keys: list[str],
        index: Mapping[str, int] | None,
        metrics: list[PodMetrics | None],
        waiting: list[int],
        foreign: list[int],
    ) -> None:
        self.version = version
        self.since = version  # positions_since knows changes from here on
        self.metrics = metrics
        self.waiting = waiting  # the engine's waiting queue per candidate, 0 when unknown
        # What a pod's load adds to our in-flight count: its waiting queue plus the
        # engine's requests beyond our count at its scrape (0 when unknown).
        self.added = list(map(add, waiting, foreign))
        self.derived: dict[object, tuple[Any, int]] = {}
        self._store = store
        self._keys = keys
        # key -> position; None when a key appears twice (a key then does not tell the
        # position), and the view is rebuilt at every change.
        self._index = index

    def positions_since(self, version: int) -> list[int] | None:
        """Positions (each once) whose metrics changed between store `version` and this
        view's, or None when that is unknown or when rebuilding is no dearer."""
        if version == self.version:
            return []
        if version < self.since:
            return None
        return self._positions(version, self.version)

    def advance(
        self,
        version: int,
        fresh: Mapping[str, PodMetrics],
        waiting: Mapping[str, int],
        foreign: Mapping[str, int],
    ) -> bool:
        """Bring the view up to store `version` in place, at the pods that changed; False
        (and unchanged) when it should be rebuilt instead."""
        positions = self._positions(self.version, version)
        if positions is None:
            return False
        pods, metrics, queues, added = self._keys, self.metrics, self.waiting, self.added
        for i in positions:
            key = pods[i]
            metrics[i] = fresh.get(key)
            queues[i] = waiting.get(key, 0)
            added[i] = queues[i] + foreign.get(key, 0)
        self.version = version
        return True

    def _positions(self, start: int, end: int) -> list[int] | None:
        """Positions of the pods the store's journal names from `start` to `end`."""
        store, index = self._store, self._index
        n = len(self._keys)
        # The journal names pods of every model: far behind, reading it costs more than
        # rebuilding this set's vectors.
        if store is None or index is None or end - start > 2 * n + 64:
            return None
        keys = store.changed_since(start)
        if keys is None:
            return None
        named = map(index.get, keys[: end - start])
        positions = list(dict.fromkeys(i for i in named if i is not None))
        return positions if worth_updating(len(positions), n) else None


def worth_updating(changed: int, n: int) -> bool:
    """Whether updating `changed` of `n` candidates one by one beats rebuilding: updating
    a pod costs about what rebuilding costs for 10-30 pods, so past an eighth of them it
    is no cheaper."""
    return changed <= 8 + n // 8


class LoadBook:
    """One candidate set's loads, kept current between decisions.

    A pick or a release moves one pod's in-flight count and a scrape what one pod's
    engine adds to it, so a decision replays the in-flight journal since the previous one and takes
    the scrape view's changed pods, rather than re-reading every pod, and keeps the
    candidates grouped by load: the lowest and highest load and the pods at a given load
    come without a pass over all candidates. Treat every list and dict here as
    read-only: they are shared until the next decision moves them.
    """

    __slots__ = (
        "_dropped",
        "_moves",
        "_ranked",
        "added",
        "groups",
        "incremental",
        "loads",
        "mark",
        "version",
        "view",
    )

    def __init__(self, loads: list[int], mark: int, incremental: bool, view: ScrapeView) -> None:
        self.loads = loads
        # The in-flight journal position and the scrape view (and its version) these
        # loads are current to, with what the engines add that they count (a copy: the
        # view changes in place).
        self.mark = mark
        self.view = view
        self.version = view.version
        self.added = list(view.added)
        # False when a pod key appears twice among the candidates: the journal names
        # keys, so positions could be missed; the book is rebuilt per decision then.
        self.incremental = incremental
        # load -> positions of the candidates at that load, ascending.
        self.groups = _group(range(len(loads)), loads)
        # owner -> (key per position, load -> keys ascending), see `grouped`.
        self._ranked: dict[object, tuple[Sequence[Any], dict[int, list[Any]]]] = {}
        # Positions whose load changed, in order, for `moved_since`.
        self._moves: list[int] = []
        self._dropped = 0  # entries trimmed from the front so far

    def moves(self) -> int:
        """The position of the journal of moved loads now: pass it to `moved_since`."""
        return self._dropped + len(self._moves)

    def moved_since(self, mark: int) -> list[int] | None:
        """Positions whose load changed since `moves()` was `mark` (with repeats), or
        None when the journal no longer reaches back that far."""
        start = mark - self._dropped
        return self._moves[start:] if start >= 0 else None

    def spread(self) -> tuple[int, int]:
        """(lowest load, highest - lowest)."""
        lo = min(self.groups)
        return lo, max(self.groups) - lo

    def grouped(self, owner: object, key_of: Sequence[Any]) -> dict[int, list[Any]]:
        """load -> the keys (`key_of[position]`: distinct, sortable, in an order of the
        owner's choosing) of the candidates at that load, ascending; kept current with
        the loads, and with the keys while the owner reports each change (`rekey`) and
        keeps the same `key_of` list."""
        found = self._ranked.get(owner)
        if found is None or found[0] is not key_of:
            found = self._ranked[owner] = (key_of, _group(key_of, self.loads))
        return found[1]

    def rekey(self, owner: object, key_of: Sequence[Any], position: int, old: Any) -> None:
        """The owner changed `key_of[position]` from `old`: move it within its group."""
        found = self._ranked.get(owner)
        if found is not None and found[0] is key_of:
            groups = found[1]
            group = groups[self.loads[position]]
            del group[bisect_left(group, old)]
            insort(group, key_of[position])

    def scraped(self, view: ScrapeView) -> Iterable[int] | None:
        """Positions whose engine's part may differ in `view` from the one these loads
        count (None: too many to update one by one)."""
        if view is self.view:
            return view.positions_since(self.version)
        # A rebuilt view: compare, by a C-level pass.
        return compress(count(), map(ne, self.added, view.added))

    def update(
        self, positions: Iterable[int], keys: list[str], counts: Mapping[str, int], view: ScrapeView
    ) -> None:
        """Load again the pods at `positions` (in-flight count + what `view` adds)."""
        if view is not self.view:
            self.view = view
            self._ranked.clear()  # the owners' keys were for the previous view
        self.version = view.version
        added, counted = view.added, self.added
        for i in positions:
            counted[i] = added[i]
            self._move(i, counts.get(keys[i], 0) + added[i])

    def _move(self, position: int, load: int) -> None:
        old = self.loads[position]
        if old == load:
            return
        self.loads[position] = load
        _regroup(self.groups, position, old, load)
        for key_of, groups in self._ranked.values():
            _regroup(groups, key_of[position], old, load)
        moves = self._moves
        moves.append(position)
        if len(moves) >= 2 * MOVES_KEEP:  # trimmed in halves: amortised O(1)
            del moves[:MOVES_KEEP]
            self._dropped += MOVES_KEEP


def _group(keys: Sequence[Any], loads: list[int]) -> dict[int, list[Any]]:
    groups: dict[int, list[Any]] = {}
    for key, load in zip(keys, loads, strict=True):
        found = groups.get(load)
        if found is None:
            groups[load] = [key]
        else:
            found.append(key)
    for found in groups.values():
        found.sort()
    return groups


def _regroup(groups: dict[int, list[Any]], key: Any, old: int, new: int) -> None:
    group = groups[old]
    del group[bisect_left(group, key)]
    if not group:
        del groups[old]
    found = groups.get(new)
    if found is None:
        groups[new] = [key]
    else:
        insort(found, key)


class CandidateSet:
    """One candidate tuple with its pod keys and (built on first use) key -> position."""

    __slots__ = ("_index", "book", "keys", "pods", "view")

    def __init__(self, pods: Sequence[Pod]) -> None:
        self.pods = pods
        self.keys = [p.key for p in pods]
        self._index: dict[str, int] | None = None
        self.view: ScrapeView | None = None
        self.book: LoadBook | None = None

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {key: i for i, key in enumerate(self.keys)}
        return self._index


class PodSignals:
    def __init__(
        self,
        store: MetricsStore | None,
        inflight: InFlightCounter,
        *,
        slow_start_window: float = 30.0,
        min_weight: float = 0.1,
        warn_every: float = 60.0,
        clock: Callable[[], float] | None = None,
        cache_size: int = 128,
    ) -> None:
        if not 0.0 < min_weight <= 1.0:
            raise ValueError("min_weight must be in (0, 1]")
        self.store = store
        self.slow_start_window = slow_start_window
        self.min_weight = min_weight
        self.warn_every = warn_every
        self.now: Callable[[], float] = clock or (store.clock if store else time.monotonic)
        self._inflight = inflight
        if store is not None:
            # The store reads our count at each scrape to tell the engine's load beyond it.
            store.count_own(inflight.count)
        self._sets: dict[int, CandidateSet] = {}
        self._cache_size = cache_size
        self._warned_at: dict[str, float] = {}
        self._fallback_counters: dict[tuple[str, str], Any] = {}

    # -- candidates ---------------------------------------------------------------------

    def candidates(self, pods: Sequence[Pod]) -> CandidateSet:
        if not isinstance(pods, tuple):
            return self._new_set(pods)
        sets = self._sets
        found = sets.get(id(pods))
        if found is not None and found.pods is pods:
            # Least recently used goes first: per-request subset tuples must not push
            # out a model's long-lived candidate tuple.
            sets[id(pods)] = sets.pop(id(pods))
            return found
        found = self._new_set(pods)
        # The entry holds the tuple, so its id cannot be reused while cached.
        if len(sets) >= self._cache_size:
            del sets[next(iter(sets))]
        sets[id(pods)] = found
        return found

    def _new_set(self, pods: Sequence[Pod]) -> CandidateSet:
        found = CandidateSet(pods)
        store = self.store
        if store is not None:
            # A pod may reach a request before the scraper's next round has seen it; its
            # slow start must begin now, or it would look idle and take the whole burst.
            store.mark_routable_all(found.keys, self.now())
        return found

    # -- signals ------------------------------------------------------------------------

    def view(self, candidates: CandidateSet, now: float) -> ScrapeView:
        """The candidates' metrics as of the store's current version: updated at the pods
        whose metrics changed since the last call, or rebuilt when most did."""
        store = self.store
        version = store.fresh_version(now) if store is not None else 0
        view = candidates.view
        if view is not None:
            if view.version == version:
                return view
            if store is not None and view.advance(
                version, store.fresh(now), store.waiting(now), store.foreign(now)
            ):
                return view
        keys = candidates.keys
        index = candidates.index if len(candidates.index) == len(keys) else None
        if store is None:
            zeros = [0] * len(keys)
            view = ScrapeView(None, version, keys, index, [None] * len(keys), zeros, list(zeros))
        else:
            view = ScrapeView(
                store,
                version,
                keys,
                index,
                list(map(store.fresh(now).get, keys)),
                list(map(store.waiting(now).get, keys, repeat(0))),
                list(map(store.foreign(now).get, keys, repeat(0))),
            )
        candidates.view = view
        return view

    def loads(self, candidates: CandidateSet, now: float) -> list[int]:
        """Load per candidate, as the load book has it (a new list, the caller's to
        change)."""
        return list(self.book(candidates, now).loads)

    def book(self, candidates: CandidateSet, now: float) -> LoadBook:
        """The candidates' current loads, grouped by load (shared: never change them).

        Only the pods whose in-flight count moved since the last decision, and those
        whose engine's part a scrape may have changed, are looked at again; it is
        rebuilt in full when that is most of them anyway.
        """
        view = self.view(candidates, now)
        inflight = self._inflight
        keys = candidates.keys
        book = candidates.book
        if book is not None and book.incremental:
            changed = inflight.changed_since(book.mark)
            scraped = book.scraped(view)
            if changed is not None and scraped is not None:
                index = candidates.index
                moved = [i for i in map(index.get, dict.fromkeys(changed)) if i is not None]
                moved.extend(scraped)
                if worth_updating(len(moved), len(keys)):
                    book.update(moved, keys, inflight.by_pod(), view)
                    book.mark = inflight.mark()
                    return book
        mark = inflight.mark()
        loads = map(inflight.by_pod().get, keys, repeat(0))  # in C: no Python call per pod
        book = LoadBook(
            list(map(add, loads, view.added)),
            mark,
            len(candidates.index) == len(keys),
            view,
        )
        candidates.book = book
        return book

    def fresh(self, now: float) -> Mapping[str, PodMetrics]:
        return self.store.fresh(now) if self.store is not None else _NO_METRICS

    def ramping(self, candidates: CandidateSet, now: float) -> list[tuple[int, float]]:
        """(position, weight < 1) of candidates in slow start: routable, no metrics yet,
        first seen less than `slow_start_window` ago."""
        store = self.store
        window = self.slow_start_window
        if store is None or window <= 0:
            return []
        cold = store.cold()
        if not cold:
            return []
        index = candidates.index
        floor = self.min_weight
        found: list[tuple[int, float]] = []
        # Newest first; stop at the first pod whose window is over (the rest are older).
        for key in reversed(cold):
            age = now - cold[key]
            if age >= window:
                break
            i = index.get(key)
            if i is not None:
                found.append((i, floor + (1.0 - floor) * max(age, 0.0) / window))
        return found

    def missing_reason(self, pod_key: str, now: float) -> str:
        """Why a pod could not be scored: no metrics ever, stale metrics, or a field the
        scorer needs is unknown."""
        store = self.store
        if store is None:
            return "no_metrics"
        latest = store.latest(pod_key)
        if latest is None:
            return "no_metrics"
        if latest.scraped_at < store.stale_before(now):
            return "stale_metrics"
        return "no_data"

    # -- fallback accounting -------------------------------------------------------------

    def fallback(self, strategy: str, pod_key: str, reason: str, now: float) -> None:
        counter = self._fallback_counters.get((strategy, reason))
        if counter is None:
            counter = telemetry.ROUTING_FALLBACK.labels(strategy, reason)
            self._fallback_counters[(strategy, reason)] = counter
        counter.inc()
        last = self._warned_at.get(pod_key)
        if last is None or now - last >= self.warn_every:
            self._warned_at[pod_key] = now
            log.warning("routing_fallback", strategy=strategy, pod=pod_key, reason=reason)

    def forget_strategy(self, strategy: str) -> None:
        """Drop the fallback series of a strategy that no longer exists (an evicted
        weighted combination)."""
        for reason in FALLBACK_REASONS:
            self._fallback_counters.pop((strategy, reason), None)
            telemetry.remove_series(telemetry.ROUTING_FALLBACK, strategy, reason)

    def forget(self, pod_key: str) -> None:
        self._warned_at.pop(pod_key, None)
        for cache_id in [i for i, s in self._sets.items() if pod_key in s.keys]:
            del self._sets[cache_id]


def probation_pick(
    rng: random.Random, weights: Collection[tuple[int, float]], candidates: int
) -> int:
    """Give each pod on probation its share of the traffic, weight / candidates: the
    position drawn, or -1 when this request is not one of theirs."""
    draw = rng.random() * candidates
    for i, weight in weights:
        draw -= weight
        if draw < 0.0:
            return i
    return -1


def weighted_choice(rng: random.Random, weights: Collection[tuple[int, float]]) -> int:
    """A position drawn in proportion to its weight (weights need not sum to 1)."""
    draw = rng.random() * sum(w for _, w in weights)
    last = -1
    for i, weight in weights:
        last = i
        draw -= weight
        if draw < 0.0:
            return i
    return last
