"""Each scorer and the metric strategies built on them: ordering, and the edge cases
(all pods equal, one pod, no metrics, stale metrics, NaN and negative values)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from prometheus_client import REGISTRY

from gateway_extproc.metrics import EngineSample, MetricsStore
from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.catalog import build_catalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.plugins import Scorer, ScoringContext
from gateway_extproc.routing.prefix import PrefixCacheScorer, PrefixIndex
from gateway_extproc.routing.registry import PluginRegistry
from gateway_extproc.routing.scorers import (
    KVCacheScorer,
    LatencyScorer,
    QueueScorer,
    ThroughputScorer,
)
from gateway_extproc.routing.signals import PodSignals

METRIC_STRATEGIES = ["least-kv-cache", "least-latency", "throughput"]
ALL_STRATEGIES = [*METRIC_STRATEGIES, "least-request", "prefix-cache", "session-affinity"]


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


class Fleet:
    """Pods, a store on a test clock, in-flight counts and a catalog over them."""

    def __init__(
        self,
        n: int,
        *,
        seed: int = 7,
        slow_start_window: float = 30.0,
        plugins: PluginRegistry | None = None,
    ) -> None:
        self.clock = Clock()
        self.store = MetricsStore(staleness=2.0, clock=self.clock)
        self.inflight = InFlightCounter()
        self.pods = tuple(
            Pod(name=f"p{i}", namespace="sc", address=f"10.1.0.{i}:8000", models=("m",))
            for i in range(n)
        )
        self.catalog = build_catalog(
            self.store,
            self.inflight,
            slow_start_window=slow_start_window,
            rng=random.Random(seed),
            plugins=plugins,
        )
        self.signals = PodSignals(self.store, self.inflight, slow_start_window=0)

    def warm(self, **values: float) -> None:
        """Two scrapes a second apart for every pod, so rates and means exist."""
        for pod in self.pods:
            self.store.mark_routable(pod.key, self.clock.now - 100)
        self.feed(self.pods, **values)

    def feed(self, pods: tuple[Pod, ...] | list[Pod], **values: float) -> None:
        for step in (0, 1):
            for pod in pods:
                sample = EngineSample(
                    running=values.get("running", 1),
                    waiting=values.get("waiting", 0),
                    kv_cache_usage=values.get("kv", 0.5),
                    ttft_sum=step * values.get("ttft", 0.1),
                    ttft_count=float(step),
                    e2e_sum=step * values.get("e2e", 1.0),
                    e2e_count=float(step),
                    prompt_tokens=step * values.get("tps", 100.0),
                    generation_tokens=0.0,
                )
                self.store.record(pod.key, sample, self.clock.now + step)
        self.clock.now += 1

    def set(self, pod: Pod, **values: float) -> None:
        self.feed([pod], **values)
        self.clock.now -= 1  # keep the others fresh

    def picks(
        self, strategy: str, times: int, request: RoutingRequest | None = None
    ) -> Counter[str]:
        chosen = self.catalog.resolve(strategy)
        assert chosen is not None
        request = request or RoutingRequest(model="m")
        return Counter(chosen.rank(self.pods, request, 1)[0].name for _ in range(times))

    def context(self, request: RoutingRequest | None = None) -> ScoringContext:
        return ScoringContext(
            self.signals.candidates(self.pods),
            request or RoutingRequest(model="m"),
            self.clock.now,
            self.signals,
        )


def fallbacks(strategy: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_routing_fallback_total", {"strategy": strategy, "reason": reason}
    )
    return value or 0.0


# -- scorers on their own ---------------------------------------------------------------


def test_kv_scorer_is_free_cache_fraction() -> None:
    fleet = Fleet(3)
    fleet.warm(kv=0.5)
    fleet.set(fleet.pods[0], kv=0.9)
    fleet.set(fleet.pods[1], kv=0.1)
    scores = KVCacheScorer().score(fleet.context())
    assert scores == pytest.approx([0.1, 0.9, 0.5])


def test_queue_scorer_min_max_over_inflight_plus_the_engines_load_beyond_it() -> None:
    fleet = Fleet(3)
    fleet.warm(running=0, waiting=0)
    fleet.set(fleet.pods[2], running=2, waiting=1)  # none ours: 3 on the pod, 1 queued
    for _ in range(2):
        fleet.inflight.acquire("m", fleet.pods[1])
    assert QueueScorer().score(fleet.context()) == pytest.approx([1.0, 0.5, 0.0])


def scrape_engines(fleets: tuple[Fleet, ...], held: dict[str, int]) -> None:
    """Every processor scrapes the same engines: `held` requests running on each."""
    for fleet in fleets:
        for pod in fleet.pods:
            fleet.set(pod, running=held[pod.key], waiting=0, kv=0.5, ttft=0.1, e2e=1.0)


@pytest.mark.parametrize("strategy", ["least-request", "least-kv-cache", "predicted-latency"])
def test_a_replica_sees_the_load_another_replica_sent(strategy: str) -> None:
    """Two processors behind one Envoy: what one sent a pod shows in the engine's
    counts only, and the other must route around it as a single processor would."""
    first, second = Fleet(4), Fleet(4)
    busy = first.pods[0]
    for _ in range(6):  # long requests the first replica sent
        first.inflight.acquire("m", busy)
    held = {pod.key: 0 for pod in first.pods}
    held[busy.key] = 6
    scrape_engines((first, second), held)
    chosen = second.catalog.resolve(strategy)
    assert chosen is not None
    for _ in range(6):
        pod = chosen.rank(second.pods, RoutingRequest(model="m"), 1)[0]
        second.inflight.acquire("m", pod)
        held[pod.key] += 1  # the engine runs it: the next scrape shows it
    assert second.inflight.count(busy.key) == 0
    # Each processor counts what it sent once: its own requests are not doubled by the
    # engine's report of them.
    scrape_engines((first, second), held)
    for fleet in (first, second):
        loads = fleet.signals.loads(fleet.signals.candidates(fleet.pods), fleet.clock.now)
        assert loads == [held[pod.key] for pod in fleet.pods]


def test_picks_and_releases_since_the_scrape_move_the_load_at_once() -> None:
    fleet = Fleet(2)
    fleet.warm(running=0, waiting=0)
    pod = fleet.pods[0]
    # None ours: 5 on the pod, and its 2 queued count again (they wait for a slot).
    fleet.store.record(pod.key, EngineSample(running=3, waiting=2))
    candidates = fleet.signals.candidates(fleet.pods)
    assert fleet.signals.loads(candidates, fleet.clock.now)[0] == 7
    for _ in range(2):
        fleet.inflight.acquire("m", pod)
    assert fleet.signals.loads(candidates, fleet.clock.now)[0] == 9
    fleet.inflight.release("m", pod)
    assert fleet.signals.loads(candidates, fleet.clock.now)[0] == 8
    # The next scrape shows our one left among the engine's six: not counted twice.
    fleet.store.record(pod.key, EngineSample(running=4, waiting=2))
    assert fleet.signals.loads(candidates, fleet.clock.now)[0] == 8


def test_latency_scorer_counts_queue_and_recent_latency() -> None:
    fleet = Fleet(3)
    fleet.warm(ttft=0.2, e2e=2.0, running=2, waiting=0)
    fleet.set(fleet.pods[0], ttft=0.1, e2e=2.0, running=2, waiting=0)
    fleet.set(fleet.pods[1], ttft=0.1, e2e=2.0, running=2, waiting=3)  # fast but queued
    scores = LatencyScorer().score(fleet.context())
    assert scores[0] == 1.0
    assert scores[1] is not None and scores[2] is not None
    assert scores[1] < scores[2] < 1.0


def test_latency_scorer_sees_picks_made_since_the_last_scrape() -> None:
    fleet = Fleet(2)
    fleet.warm(ttft=0.1, e2e=1.0, running=1, waiting=0)
    for _ in range(5):  # routed after the scrape: the engine does not show them yet
        fleet.inflight.acquire("m", fleet.pods[0])
    scores = LatencyScorer().score(fleet.context())
    assert scores[1] == 1.0 and scores[0] is not None and scores[0] < 0.5


def test_throughput_scorer_prefers_the_least_busy() -> None:
    fleet = Fleet(3)
    fleet.warm(tps=100.0)
    fleet.set(fleet.pods[0], tps=300.0)
    fleet.set(fleet.pods[1], tps=200.0)
    assert ThroughputScorer().score(fleet.context()) == pytest.approx([0.0, 0.5, 1.0])


def test_metric_scorers_have_no_data_without_fresh_metrics() -> None:
    fleet = Fleet(2)
    fleet.warm()
    fleet.clock.now += 10  # everything stale
    ctx = fleet.context()
    for scorer in (KVCacheScorer(), LatencyScorer(), ThroughputScorer()):
        assert scorer.score(ctx) == [None, None]
    assert QueueScorer().score(ctx) == [1.0, 1.0]  # our own counts never go stale


@pytest.mark.parametrize("bad", [math.nan, -0.5, math.inf])
def test_metric_scorers_treat_bad_values_as_missing(bad: float) -> None:
    fleet = Fleet(2)
    fleet.warm()
    fleet.set(fleet.pods[0], kv=bad, ttft=bad, tps=bad)
    ctx = fleet.context()
    assert KVCacheScorer().score(ctx)[0] is None
    assert LatencyScorer().score(ctx)[0] is None
    assert ThroughputScorer().score(ctx)[0] is None
    assert KVCacheScorer().score(ctx)[1] is not None


def test_prefix_scorer_is_matched_share_guarded_by_load() -> None:
    fleet = Fleet(3)
    fleet.warm()
    index = PrefixIndex(block_chars=4)
    scorer = PrefixCacheScorer(index, max_load_gap=2)
    request = RoutingRequest(model="m", prompt="abcdefghijklmnop")  # 4 blocks
    index.record(fleet.pods[0].key, index.hashes("m", "abcdefgh"))
    index.record(fleet.pods[1].key, index.hashes("m", "abcdefghijklmnop"))
    assert scorer.score(fleet.context(request)) == [0.5, 1.0, 0.0]
    for _ in range(3):  # pod 1 is now busier than the least busy by more than 2
        fleet.inflight.acquire("m", fleet.pods[1])
    assert scorer.score(fleet.context(request)) == [0.5, 0.0, 0.0]


def test_prefix_index_is_per_model_and_cumulative() -> None:
    index = PrefixIndex(block_chars=4)
    assert index.hashes("m", "abc") == []  # no full block
    a = index.hashes("m", "abcdWXYZ")
    b = index.hashes("m", "abcdQRST")
    assert a[0] == b[0] and a[1] != b[1]
    assert index.hashes("other", "abcd") != index.hashes("m", "abcd")
    index.record("pod", a)
    assert index.matches(b) == {"pod": 1}
    assert index.matches(a) == {"pod": 2}


def test_prefix_index_lru_is_bounded_per_pod_and_forgets() -> None:
    index = PrefixIndex(block_chars=1, blocks_per_pod=3)
    index.record("pod", index.hashes("m", "abcdef"))
    assert index.blocks("pod") == 3
    index.record("other", index.hashes("m", "abc"))
    assert index.matches(index.hashes("m", "abc")) == {"other": 3}  # pod's oldest evicted
    index.forget("other")
    assert index.matches(index.hashes("m", "abc")) == {}
    assert index.blocks("other") == 0


# -- strategies: the edge cases every one of them must survive ---------------------------


@pytest.mark.parametrize("name", ALL_STRATEGIES)
def test_one_pod_is_always_the_pick(name: str) -> None:
    fleet = Fleet(1)
    strategy = fleet.catalog.resolve(name)
    assert strategy is not None
    request = RoutingRequest(model="m", prompt="x" * 300, session_id="s")
    assert strategy.rank(fleet.pods, request, 3) == [fleet.pods[0]]
    assert strategy.rank((), request, 1) == []


@pytest.mark.parametrize("name", ALL_STRATEGIES)
def test_equal_pods_share_the_load(name: str) -> None:
    fleet = Fleet(4)
    fleet.warm()
    picks = fleet.picks(name, 400)
    assert set(picks) == {"p0", "p1", "p2", "p3"}, picks
    assert min(picks.values()) > 40, picks


@pytest.mark.parametrize("name", ALL_STRATEGIES)
def test_no_metrics_at_all_still_routes_everywhere(name: str) -> None:
    fleet = Fleet(4, slow_start_window=0)
    picks = fleet.picks(name, 400)
    assert set(picks) == {"p0", "p1", "p2", "p3"}, picks


@pytest.mark.parametrize("name", METRIC_STRATEGIES)
def test_no_metrics_falls_back_to_random_and_counts(name: str) -> None:
    fleet = Fleet(3, slow_start_window=0)
    before = fallbacks(name, "no_metrics")
    picks = fleet.picks(name, 300)
    assert min(picks.values()) > 60, picks
    assert fallbacks(name, "no_metrics") == before + 300


@pytest.mark.parametrize("name", METRIC_STRATEGIES)
def test_stale_metrics_fall_back_with_their_reason(name: str) -> None:
    fleet = Fleet(3)
    fleet.warm()
    fleet.clock.now += 3.0  # past the 2 s staleness
    before = fallbacks(name, "stale_metrics")
    picks = fleet.picks(name, 300)
    assert min(picks.values()) > 60, picks
    assert fallbacks(name, "stale_metrics") == before + 300


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("least-kv-cache", {"kv": 0.1}, {"kv": 0.9}),
        ("least-latency", {"ttft": 0.05}, {"ttft": 2.0}),
        ("throughput", {"tps": 10.0}, {"tps": 5000.0}),
        ("least-request", {"waiting": 0}, {"waiting": 20}),
    ],
)
def test_strategy_prefers_the_better_pod(
    name: str, good: dict[str, float], bad: dict[str, float]
) -> None:
    fleet = Fleet(3)
    fleet.warm(**bad)
    fleet.set(fleet.pods[1], **good)
    assert fleet.picks(name, 50) == {"p1": 50}


@pytest.mark.parametrize("name", METRIC_STRATEGIES)
def test_a_pod_with_bad_values_is_neither_preferred_nor_skipped(name: str) -> None:
    fleet = Fleet(4)
    fleet.warm(kv=0.8, ttft=1.0, tps=1000.0)
    fleet.set(fleet.pods[0], kv=math.nan, ttft=-1.0, tps=math.nan, running=-3, waiting=-1)
    before = fallbacks(name, "no_data")
    picks = fleet.picks(name, 400)
    # Unscorable, it takes a fair random share (1/4) rather than all or nothing.
    assert 50 < picks["p0"] < 160, picks
    assert fallbacks(name, "no_data") == before + picks["p0"]


# -- what scorers keep between decisions: the same scores as built afresh ------------------


def varied_fleet(
    seed: int, n: int = 40, running: int = 6, plugins: PluginRegistry | None = None
) -> Fleet:
    """A fleet whose pods differ in every metric and in what is in flight."""
    fleet = Fleet(n, seed=seed, plugins=plugins)
    fleet.warm()
    rng = random.Random(seed)
    for pod in fleet.pods:
        fleet.set(
            pod,
            kv=rng.uniform(0.0, 1.0),
            ttft=rng.uniform(0.01, 0.5),
            e2e=rng.uniform(0.5, 5.0),
            running=rng.randint(0, running),
            waiting=rng.randint(0, 3),
            tps=rng.uniform(10.0, 500.0),
        )
        for _ in range(rng.randint(0, 3)):
            fleet.inflight.acquire("m", pod)
    return fleet


def live_scrape(fleets: tuple[Fleet, ...], rng: random.Random, step: int) -> None:
    """What the scraper does between two decisions on a large fleet: one to three pods
    record a scrape, now and then a burst of many, a pod losing a metric (until its next
    scrape), a pod's metrics forgotten, or time jumping on so that pods not scraped for
    a while go stale; the same in every fleet."""
    pods = fleets[0].pods
    burst = step % 37 == 36
    for k in rng.sample(range(len(pods)), len(pods) // 2 if burst else rng.randint(1, 3)):
        # Counters grow (with noise) as `step` does, so rates and recent means exist.
        sample = EngineSample(
            running=rng.randint(0, 30),
            waiting=rng.randint(0, 3),
            kv_cache_usage=rng.uniform(0.0, 1.0) if rng.random() > 0.005 else math.nan,
            ttft_sum=(step + rng.random()) * 0.2 if rng.random() > 0.005 else None,
            ttft_count=float(step),
            e2e_sum=(step + rng.random()) * 2.0,
            e2e_count=float(step),
            prompt_tokens=(step + rng.random()) * 300.0,
            generation_tokens=0.0,
        )
        for fleet in fleets:
            fleet.store.record(pods[k].key, sample, fleet.clock.now)
    if step % 53 == 52:
        for fleet in fleets:
            fleet.store.forget(pods[step % len(pods)].key)
    for fleet in fleets:
        fleet.clock.now += 1.6 if step % 149 == 148 else 0.01


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_scores_kept_across_scrapes_equal_a_fresh_build(seed: int) -> None:
    """Every scorer's scores, with what it keeps updated pod by pod as scrapes land (and
    expire, and are forgotten), equal the scores built from scratch, float for float."""
    fleet = varied_fleet(seed)
    latency = LatencyScorer()
    scorers: list[Scorer] = [KVCacheScorer(), latency, ThroughputScorer(), QueueScorer()]
    rng = random.Random(seed)
    for step in range(400):
        live_scrape((fleet,), rng, step)
        pod = fleet.pods[rng.randrange(len(fleet.pods))]
        if rng.random() < 0.6:
            fleet.inflight.acquire("m", pod)
        else:
            fleet.inflight.release("m", pod)
        kept = fleet.context()
        signals = PodSignals(fleet.store, fleet.inflight)  # keeps nothing yet
        fresh = ScoringContext(
            signals.candidates(fleet.pods), RoutingRequest(model="m"), fleet.clock.now, signals
        )
        for scorer in scorers:
            assert scorer.score(kept) == type(scorer)().score(fresh), (step, scorer.name)
        scores = LatencyScorer().score(fresh)
        near = None
        if None not in scores:
            cut = max(scores) - 0.02  # type: ignore[type-var,operator]
            near = [i for i, score in enumerate(scores) if score >= cut]  # type: ignore[operator]
        assert latency.near(kept, 0.02) == near, step


def reference_latency(fleet: Fleet) -> list[float | None]:
    """LatencyScorer's formula, written out per pod."""
    expected: list[float | None] = []
    for pod in fleet.pods:
        m = fleet.store.get(pod.key)
        if m is None or m.ttft_mean_recent is None:
            expected.append(None)
            continue
        running, waiting = m.running or 0, m.waiting or 0
        # Our count plus the engine's requests beyond ours at the scrape: the requests
        # on the pod; its load adds the waiting queue.
        on_pod = fleet.inflight.count(pod.key) + fleet.store.foreign().get(pod.key, 0)
        ahead = max(waiting, on_pod - running, 0)
        per_slot = m.e2e_mean_recent / max(running, 1) if m.e2e_mean_recent else m.ttft_mean_recent
        expected.append(m.ttft_mean_recent + ahead * per_slot + LatencyScorer.FLOOR_SECONDS)
    best = min(v for v in expected if v is not None)
    return [None if v is None else best / v for v in expected]


def test_latency_scorer_matches_its_formula_as_loads_move() -> None:
    fleet = varied_fleet(5)
    fleet.set(fleet.pods[3], ttft=math.nan)  # one pod without data
    scorer = LatencyScorer()
    rng = random.Random(5)
    for _ in range(200):
        assert scorer.score(fleet.context()) == reference_latency(fleet)
        pod = fleet.pods[rng.randrange(len(fleet.pods))]
        if rng.random() < 0.6:
            fleet.inflight.acquire("m", pod)
        else:
            fleet.inflight.release("m", pod)


def test_per_scrape_vectors_follow_scrapes_and_expiry() -> None:
    fleet = Fleet(2)
    fleet.warm(kv=0.5)
    version = fleet.store.version
    assert KVCacheScorer().score(fleet.context()) == [0.5, 0.5]
    fleet.set(fleet.pods[0], kv=0.25)
    assert fleet.store.version > version
    assert KVCacheScorer().score(fleet.context()) == [0.75, 0.5]
    fleet.clock.now += 10  # both stale
    assert KVCacheScorer().score(fleet.context()) == [None, None]
    fleet.store.forget(fleet.pods[0].key)
    fleet.clock.now -= 10
    assert KVCacheScorer().score(fleet.context())[0] is None


def test_kept_scores_see_expiry_and_first_scrapes_at_once() -> None:
    """What is kept between decisions is updated, not rebuilt, when a few pods change:
    that must not delay anything. Metrics past the staleness stop counting on the next
    decision, and a pod's first scrape (its cold start over) counts on the next one."""
    fleet = Fleet(20)
    store, clock, pods = fleet.store, fleet.clock, fleet.pods
    newcomer = pods[19]  # routable, never scraped yet
    start = clock.now
    for pod in pods[:19]:
        store.record(pod.key, EngineSample(kv_cache_usage=0.5), start)
    scorer = KVCacheScorer()
    view = fleet.context().view()
    assert scorer.score(fleet.context())[19] is None
    for pod in pods[2:19]:  # scraped again one by one, a decision after each
        clock.now += 0.05
        store.record(pod.key, EngineSample(kv_cache_usage=0.5), clock.now)
        scorer.score(fleet.context())
    clock.now = start + store.staleness  # pods 0 and 1 exactly at the limit: fresh
    assert scorer.score(fleet.context())[:3] == [0.5, 0.5, 0.5]
    clock.now += 0.01
    assert scorer.score(fleet.context())[:3] == [None, None, 0.5]
    store.record(newcomer.key, EngineSample(kv_cache_usage=0.0), clock.now)
    assert scorer.score(fleet.context())[19] == 1.0
    assert fleet.context().view() is view  # updated in place throughout
    for pod in pods[:2]:
        store.record(pod.key, EngineSample(kv_cache_usage=0.5), clock.now)
    assert fleet.picks("least-kv-cache", 20) == {newcomer.name: 20}
