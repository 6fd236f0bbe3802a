"""The scrape view and the load book: per-candidate metrics kept current from the store's
journal, and loads kept current from the in-flight journal, must equal reading every pod
afresh, through picks, releases, deleted pods, scrapes, expiry and journals that no
longer reach back; and least-request's pick from the book must be the pick a scan over
every candidate makes, with the same random draws."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from typing import Any

import pytest

from gateway_extproc.metrics import EngineSample, MetricsStore
from gateway_extproc.metrics import store as store_module
from gateway_extproc.models.registry import Pod
from gateway_extproc.routing import inflight as inflight_module
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.pickers import MaxScorePicker
from gateway_extproc.routing.plugins import WeightedScorers
from gateway_extproc.routing.scorers import QueueScorer
from gateway_extproc.routing.signals import (
    LoadBook,
    PodSignals,
    probation_pick,
    weighted_choice,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pods(n: int) -> tuple[Pod, ...]:
    return tuple(
        Pod(name=f"p{i}", namespace="sg", address=f"10.3.0.{i}:8000", models=("m",))
        for i in range(n)
    )


def scrape(store: MetricsStore, pod: Pod, now: float, waiting: int | None) -> None:
    store.record(pod.key, EngineSample(running=2, waiting=waiting, kv_cache_usage=0.5), now)


def direct_loads(
    store: MetricsStore, inflight: InFlightCounter, pods: tuple[Pod, ...], now: float
) -> list[int]:
    """Our in-flight count, the engine's requests beyond it at its scrape, and its
    waiting queue (counted again: queued requests wait for a slot)."""
    waiting, foreign = store.waiting(now), store.foreign(now)
    return [inflight.count(p.key) + foreign.get(p.key, 0) + waiting.get(p.key, 0) for p in pods]


def groups_of(loads: list[int], rank_of: Sequence[Any]) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for i, load in enumerate(loads):
        out.setdefault(load, []).append(rank_of[i])
    return {load: sorted(ranks) for load, ranks in out.items()}


@pytest.mark.parametrize("keep", [inflight_module.JOURNAL_KEEP, 4])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_load_book_equals_a_fresh_read(
    monkeypatch: pytest.MonkeyPatch, keep: int, seed: int
) -> None:
    monkeypatch.setattr(inflight_module, "JOURNAL_KEEP", keep)  # 4: often too far back
    monkeypatch.setattr(store_module, "JOURNAL_KEEP", keep)
    rng = random.Random(seed)
    clock = Clock()
    store = MetricsStore(staleness=5.0, clock=clock)
    inflight = InFlightCounter()
    signals = PodSignals(store, inflight, clock=clock)
    pods = make_pods(30)
    subset = tuple(rng.sample(pods, 10))
    twice = (*pods[:5], pods[2])  # a key twice: positions the journal cannot tell apart
    for pod in pods[:20]:
        scrape(store, pod, clock.now, rng.randint(0, 3))
    owner, keeper = object(), object()
    # The keeper's keys change a few at a time and it reports each change (`rekey`).
    kept = {len(c): [(rng.random(), i) for i in range(len(c))] for c in (pods, subset, twice)}
    advanced = followed_moves = 0
    followed: dict[int, tuple[LoadBook, int, list[int]]] = {}
    for step in range(600):
        pod = rng.choice(pods)
        action = rng.random()
        if action < 0.4:
            inflight.acquire("m", pod)
        elif action < 0.75:
            inflight.release("m", pod)
        elif action < 0.8:
            inflight.forget(pod)
        elif action < 0.95:
            scrape(store, pod, clock.now, rng.choice((None, *range(5))))
        elif action < 0.96:
            store.forget(pod.key)
        elif action < 0.97:
            for other in rng.sample(pods, 12):  # a burst: more than is worth updating
                scrape(store, other, clock.now, rng.randint(0, 4))
        else:
            clock.now += rng.choice((0.5, 3.0))  # sometimes far enough for metrics to expire
        if rng.random() < 0.5:
            continue  # changes pile up between decisions
        for candidates in (pods, subset, twice):
            cs = signals.candidates(candidates)
            key_of = kept[len(candidates)]
            if cs.book is not None:
                for i in rng.sample(range(len(candidates)), 2):
                    old, key_of[i] = key_of[i], (rng.random(), i)
                    cs.book.rekey(keeper, key_of, i, old)
            before = cs.view
            version = before.version if before is not None else -1
            book = signals.book(cs, clock.now)
            view = cs.view
            assert view is not None
            advanced += view is before and view.version != version
            fresh, waiting = store.fresh(clock.now), store.waiting(clock.now)
            assert view.metrics == [fresh.get(p.key) for p in candidates], step
            assert view.waiting == [waiting.get(p.key, 0) for p in candidates], step
            expected = direct_loads(store, inflight, candidates, clock.now)
            assert book.loads == expected, step
            assert book.groups == groups_of(expected, list(range(len(candidates)))), step
            # A new order of the owner's every time: the book must not keep groups in
            # an order it was given before.
            order_rng = random.Random(f"{book.version} {len(candidates)}")
            rank_of = order_rng.sample(range(len(candidates)), len(candidates))
            assert book.grouped(owner, rank_of) == groups_of(expected, rank_of), step
            assert book.grouped(keeper, key_of) == groups_of(expected, key_of), step
            assert book.spread() == (min(expected), max(expected) - min(expected))
            # A reader following the book's journal of moved loads misses no move.
            seen = followed.get(len(candidates))
            if seen is not None and seen[0] is book:
                moved = book.moved_since(seen[1])
                if moved is not None:
                    loads_then = seen[2]
                    changed = {i for i, load in enumerate(book.loads) if load != loads_then[i]}
                    assert changed <= set(moved), step
                    followed_moves += 1
            followed[len(candidates)] = (book, book.moves(), list(book.loads))
    assert advanced > 50  # the view was updated in place, not only rebuilt
    assert followed_moves > 50


def reference_least_request(
    rng: random.Random, loads: list[float], ramping: list[tuple[int, float]], count: int
) -> list[int]:
    """Least-request's pick written as a scan over every candidate: pods in slow start
    take their share, then the least loaded (ties at random); fallback endpoints are
    the next least loaded, equal ones in random order, pods in slow start last."""
    n = len(loads)
    chosen = probation_pick(rng, ramping, n) if ramping else -1
    for i, _ in ramping:
        loads[i] = math.inf
    if chosen < 0:
        low = min(loads)
        if low == math.inf:
            chosen = weighted_choice(rng, ramping)
        else:
            tied = [i for i, load in enumerate(loads) if load == low]
            chosen = tied[rng.randrange(len(tied))] if len(tied) > 1 else tied[0]
    if count <= 1:
        return [chosen]
    order = [i for i in range(n) if i != chosen]
    rng.shuffle(order)
    return [chosen, *heapq.nsmallest(count - 1, order, key=loads.__getitem__)]


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_least_request_picks_as_a_scan(seed: int, count: int) -> None:
    rng = random.Random(seed)
    clock = Clock()
    store = MetricsStore(staleness=5.0, clock=clock)
    inflight = InFlightCounter()
    signals = PodSignals(store, inflight, clock=clock, slow_start_window=30.0)
    queue = QueueScorer()
    strategy = MaxScorePicker(
        "least-request",
        WeightedScorers([(queue, 1.0)]),
        signals,
        random.Random(seed),
        tiebreak=queue,
    )
    reference_rng = random.Random(seed)
    pods = make_pods(40)
    for pod in pods[:36]:
        store.mark_routable(pod.key, clock.now - 60)
        scrape(store, pod, clock.now, rng.randint(0, 2))
    for pod in pods[36:]:  # in slow start for part of the run
        store.mark_routable(pod.key, clock.now - 5)
    cs = signals.candidates(pods)
    for step in range(400):
        ramping = signals.ramping(cs, clock.now)
        loads: list[float] = list(direct_loads(store, inflight, pods, clock.now))
        expected = reference_least_request(reference_rng, loads, ramping, count)
        picked = strategy.rank(pods, RoutingRequest("m"), count)
        assert [p.key for p in picked] == [pods[i].key for i in expected], step
        inflight.acquire("m", picked[0])
        if rng.random() < 0.5:
            inflight.release("m", rng.choice(pods))
        if step == 200:
            clock.now += 30  # the cold pods' slow start is over
