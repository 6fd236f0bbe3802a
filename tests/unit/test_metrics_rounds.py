"""Scrape rounds longer than --metrics-staleness (a large fleet): routing keeps using the
metrics of the latest completed round instead of falling back to random, pods whose
scrapes fail still go stale, and the round's length is reported.

The scraper here fetches from no network: each scrape just takes `delay` seconds, with at
most one at a time, so a round of 8 pods takes about 8 x `delay`, the way a round of
5,000 real pods takes seconds on a small machine."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from prometheus_client import REGISTRY

from gateway_extproc.metrics import EngineSample, MetricsScraper, MetricsStore
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.catalog import build_catalog
from gateway_extproc.routing.inflight import InFlightCounter


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SlowScraper(MetricsScraper):
    """Each scrape takes `delay` and answers the pod's canned KV-cache usage; a pod in
    `failing` answers an error instead."""

    def __init__(
        self,
        registry: ModelRegistry,
        store: MetricsStore,
        *,
        delay: float,
        kv: dict[str, float],
        **options: Any,
    ) -> None:
        super().__init__(registry, store, **options)
        self.delay = delay
        self.kv = kv
        self.failing: set[str] = set()

    async def _fetch(self, pod: Pod) -> str:
        await asyncio.sleep(self.delay)
        if pod.key in self.failing:
            raise RuntimeError("engine down")
        return (
            f'vllm:kv_cache_usage_perc{{model_name="m"}} {self.kv[pod.key]}\n'
            'vllm:num_requests_waiting{model_name="m"} 0\n'
            'vllm:num_requests_running{model_name="m"} 1\n'
        )


def fallbacks(strategy: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_routing_fallback_total", {"strategy": strategy, "reason": reason}
    )
    return value or 0.0


def round_seconds() -> float | None:
    return REGISTRY.get_sample_value("gateway_metrics_round_seconds")


def loopback_pods(n: int) -> list[Pod]:
    return [
        Pod(name=f"p{i}", namespace="rounds", address=f"127.0.0.1:{20000 + i}", models=("m",))
        for i in range(n)
    ]


async def test_rounds_longer_than_staleness_keep_metric_routing() -> None:
    """8 pods, one scrape at a time of 50 ms each: a round takes ~0.4 s against a
    staleness of 0.15 s. Every pod keeps its metrics from the latest completed round, so
    least-kv-cache always picks the emptiest pod and never falls back for stale metrics."""
    pods = loopback_pods(8)
    registry = ModelRegistry()
    registry.replace_all(pods)
    store = MetricsStore(staleness=0.15)
    kv = {pod.key: 0.9 for pod in pods}
    best = pods[5]
    kv[best.key] = 0.1
    scraper = SlowScraper(
        registry, store, interval=0.05, timeout=1.0, concurrency=1, delay=0.05, kv=kv
    )
    strategy = build_catalog(store, InFlightCounter(), rng=random.Random(3)).resolve(
        "least-kv-cache"
    )
    assert strategy is not None
    request = RoutingRequest(model="m")
    await scraper.start()
    try:
        deadline = time.monotonic() + 3.0
        while any(store.latest(pod.key) is None for pod in pods):  # the first round
            assert time.monotonic() < deadline, "first round never completed"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)  # the round's completion is reported just after
        stale_before = fallbacks("least-kv-cache", "stale_metrics")
        fresh_counts, picks = [], []
        for _ in range(60):  # ~1.2 s: three rounds and more
            fresh_counts.append(len(store.fresh()))
            picks.append(strategy.rank(pods, request, 1)[0].name)
            await asyncio.sleep(0.02)
    finally:
        await scraper.stop()
    assert fresh_counts == [len(pods)] * len(fresh_counts)
    assert set(picks) == {best.name}
    assert fallbacks("least-kv-cache", "stale_metrics") == stale_before
    length = round_seconds()
    assert length is not None and length > store.staleness


async def test_a_failing_pod_still_goes_stale_in_slow_rounds() -> None:
    pods = loopback_pods(6)
    registry = ModelRegistry()
    registry.replace_all(pods)
    store = MetricsStore(staleness=0.1)
    kv = {pod.key: 0.5 for pod in pods}
    scraper = SlowScraper(
        registry, store, interval=0.02, timeout=1.0, concurrency=1, delay=0.04, kv=kv
    )
    broken = pods[0].key
    await scraper.start()
    try:
        deadline = time.monotonic() + 3.0
        while len(store.fresh()) < len(pods):  # the first round completed
            assert time.monotonic() < deadline, "first round never completed"
            await asyncio.sleep(0.01)
        scraper.failing.add(broken)
        # Gone once a round completes without it: within about two rounds (~0.5 s).
        deadline = time.monotonic() + 1.0
        while broken in store.fresh():
            assert time.monotonic() < deadline, "a failing pod's metrics stayed fresh"
            await asyncio.sleep(0.01)
        assert store.get(broken) is None and store.latest(broken) is not None
        assert len(store.fresh()) == len(pods) - 1  # the healthy ones stay in use
    finally:
        await scraper.stop()


# -- the store's rule, on a test clock ---------------------------------------------------


def test_metrics_of_the_latest_completed_round_stay_fresh() -> None:
    clock = Clock()
    store = MetricsStore(staleness=2.0, clock=clock)
    sample = EngineSample(kv_cache_usage=0.5, waiting=1)
    # Round 1: a, b, c scraped over 5 s; completed at 1005.
    start1 = clock.now
    for key in "abc":
        store.record(key, sample)
        clock.now += 5 / 3
    store.round_completed(start1, 5.0)
    assert set(store.fresh()) == {"a", "b", "c"}  # "a" is 5 s old, > 2 s staleness
    # Round 2 under way: "a" and "b" scraped again, "c" fails.
    start2 = clock.now
    store.record("a", sample)
    clock.now += 2
    store.record("b", sample)
    clock.now += 3
    assert set(store.fresh()) == {"a", "b", "c"}  # c is from round 1: still the latest
    assert store.get("c") is not None
    store.round_completed(start2, 5.0)
    assert set(store.fresh()) == {"a", "b"}  # round 2 completed without c: stale
    assert store.get("c") is None and store.latest("c") is not None
    assert dict(store.waiting()) == {"a": 1, "b": 1}


def test_round_metrics_never_outlive_a_few_rounds() -> None:
    """Should rounds stop completing, metrics still expire: after ROUND_LIMIT rounds."""
    clock = Clock()
    store = MetricsStore(staleness=1.0, clock=clock)
    start = clock.now
    store.record("a", EngineSample(waiting=1))
    clock.now += 4
    store.round_completed(start, 4.0)
    clock.now += 4 * 3 - 4  # ROUND_LIMIT (3) x 4 s after the scrape
    assert "a" in store.fresh()
    clock.now += 0.01
    assert "a" not in store.fresh() and store.get("a") is None


def test_fast_rounds_change_nothing() -> None:
    """Rounds shorter than the staleness: the staleness alone decides, as before."""
    clock = Clock()
    store = MetricsStore(staleness=2.0, clock=clock)
    store.record("a", EngineSample(waiting=1))
    clock.now += 0.2
    store.round_completed(clock.now - 0.2, 0.2)
    clock.now += 1.8
    assert store.get("a") is not None  # exactly 2 s old
    clock.now += 0.01
    assert store.get("a") is None


def test_a_pod_fresh_by_its_round_is_not_called_stale_when_a_field_is_missing() -> None:
    from gateway_extproc.routing.signals import PodSignals

    clock = Clock()
    store = MetricsStore(staleness=2.0, clock=clock)
    start = clock.now
    store.record("a", EngineSample(waiting=1))  # no KV-cache figure from this engine
    clock.now += 5
    store.round_completed(start, 5.0)
    signals = PodSignals(store, InFlightCounter(), clock=clock)
    # Fresh by the round rule although 5 s old: the fallback names the missing field.
    assert signals.missing_reason("a", clock.now) == "no_data"
    clock.now += 30  # beyond the round limit: now it is stale
    assert signals.missing_reason("a", clock.now) == "stale_metrics"
