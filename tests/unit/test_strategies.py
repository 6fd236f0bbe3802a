"""Strategies as the router uses them: least-request under bursts, slow start for cold
pods, fallback accounting, weighted combinations, prefix-cache and session stickiness,
and forgetting deleted pods."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from gateway_extproc.metrics import EngineSample, MetricsStore
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing import signals as signals_module
from gateway_extproc.routing.base import NoCandidates, RoutingRequest, Strategy
from gateway_extproc.routing.catalog import (
    StrategyCatalog,
    build_catalog,
    canonical_name,
    parse_weights,
)
from gateway_extproc.routing.config import parse_routing_config
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.pickers import MaxScorePicker
from gateway_extproc.routing.plugins import PluginEnv, Scorer
from gateway_extproc.routing.profile import Profile
from gateway_extproc.routing.registry import PLUGINS
from gateway_extproc.routing.scorers import KVCacheScorer


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


def make_pods(n: int, prefix: str = "p") -> tuple[Pod, ...]:
    return tuple(
        Pod(name=f"{prefix}{i}", namespace="st", address=f"10.2.0.{i}:8000", models=("m",))
        for i in range(n)
    )


class Setup:
    def __init__(
        self, n: int = 4, *, store: bool = True, seed: int = 3, **catalog_args: Any
    ) -> None:
        self.clock = Clock()
        self.store = MetricsStore(clock=self.clock) if store else None
        self.inflight = InFlightCounter()
        self.registry = ModelRegistry()
        self.pods = make_pods(n)
        self.registry.replace_all(self.pods)
        self.catalog = build_catalog(
            self.store,
            self.inflight,
            rng=random.Random(seed),
            registry=self.registry,
            clock=self.clock if self.store is None else None,
            **catalog_args,
        )

    def strategy(self, name: str) -> Strategy:
        found = self.catalog.resolve(name)
        assert found is not None
        return found

    def scrape(self, pod: Pod, waiting: int = 0, kv: float = 0.5) -> None:
        assert self.store is not None
        self.store.mark_routable(pod.key)
        self.store.record(pod.key, EngineSample(running=1, waiting=waiting, kv_cache_usage=kv))

    def candidates(self) -> tuple[Pod, ...]:
        return self.registry.lookup("m").routable

    def route(self, name: str, request: RoutingRequest | None = None) -> Pod:
        """Pick and count in flight, as the router does."""
        pod = self.strategy(name).rank(self.candidates(), request or RoutingRequest("m"), 1)[0]
        self.inflight.acquire("m", pod)
        return pod


def fallbacks(strategy: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_routing_fallback_total", {"strategy": strategy, "reason": reason}
    )
    return value or 0.0


# -- least-request ------------------------------------------------------------------------


def test_least_request_spreads_a_burst_before_any_metric_moves() -> None:
    setup = Setup(4)
    for pod in setup.pods:
        setup.scrape(pod)
    picks = Counter(setup.route("least-request").name for _ in range(40))
    assert picks == {"p0": 10, "p1": 10, "p2": 10, "p3": 10}


def test_least_request_adds_the_engine_queue() -> None:
    setup = Setup(3)
    setup.scrape(setup.pods[0], waiting=5)
    setup.scrape(setup.pods[1], waiting=0)
    setup.scrape(setup.pods[2], waiting=1)
    for _ in range(3):
        setup.inflight.acquire("m", setup.pods[1])
    # Each engine runs 1 request we did not send. p2: 1 running + 1 queued, the queue
    # counted twice = 3 < p1: ours 3 + 1 running = 4 < p0: 1 + 5 + 5 = 11.
    assert setup.route("least-request").name == "p2"


def test_least_request_fallback_endpoints_are_next_least_loaded() -> None:
    setup = Setup(4)
    for pod, waiting in zip(setup.pods, (3, 0, 2, 1), strict=True):
        setup.scrape(pod, waiting=waiting)
    ranked = setup.strategy("least-request").rank(setup.candidates(), RoutingRequest("m"), 3)
    assert [p.name for p in ranked] == ["p1", "p3", "p2"]


def test_least_request_without_a_store_uses_in_flight_only_and_never_falls_back() -> None:
    setup = Setup(3, store=False)
    before = fallbacks("least-request", "no_metrics")
    picks = Counter(setup.route("least-request").name for _ in range(30))
    assert picks == {"p0": 10, "p1": 10, "p2": 10}
    assert fallbacks("least-request", "no_metrics") == before


# -- slow start -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["least-request", "least-kv-cache", "prefix-cache"])
def test_cold_pod_gets_a_small_share_that_ramps_up(name: str) -> None:
    setup = Setup(4, slow_start_window=30.0)
    warm, cold = setup.pods[:3], setup.pods[3]
    for pod in warm:
        setup.scrape(pod)
    setup.store.mark_routable(cold.key)  # type: ignore[union-attr]
    strategy = setup.strategy(name)
    request = RoutingRequest("m")

    def share() -> float:
        picks = [strategy.rank(setup.candidates(), request, 1)[0] for _ in range(4000)]
        return sum(p is cold for p in picks) / len(picks)

    at_start = share()
    assert 0.01 < at_start < 0.06  # min weight 0.1 of a fair 1/4 share
    setup.clock.now += 15.0
    for pod in warm:
        setup.scrape(pod)
    halfway = share()
    assert 0.1 < halfway < 0.2  # weight 0.55 of 1/4
    setup.scrape(cold)  # metrics arrived: the ramp ends early
    if name == "prefix-cache":
        assert 0.18 < share() < 0.32  # competes as an equal
    else:
        assert share() > 0.18


def test_pod_first_seen_by_a_request_starts_its_ramp_then() -> None:
    setup = Setup(2)
    setup.scrape(setup.pods[0])
    newcomer = setup.pods[1]
    assert setup.store is not None and setup.store.first_routable_at(newcomer.key) is None
    picks = Counter(setup.route("least-request").name for _ in range(200))
    assert setup.store.first_routable_at(newcomer.key) == setup.clock.now
    # The newcomer looked idle (0 in flight) but is not flooded: a small share only.
    assert 0 < picks["p1"] < 30, picks


def test_all_pods_cold_is_plain_random() -> None:
    setup = Setup(3)
    for pod in setup.pods:
        setup.store.mark_routable(pod.key)  # type: ignore[union-attr]
    for name in ("least-request", "least-kv-cache"):
        picks = Counter(
            setup.strategy(name).rank(setup.pods, RoutingRequest("m"), 1)[0].name
            for _ in range(300)
        )
        assert min(picks.values()) > 60, (name, picks)


# -- fallback accounting ------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.warnings: list[dict[str, Any]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.warnings.append({"event": event, **kw})


def test_fallbacks_are_counted_each_time_but_warned_once_per_pod_per_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(signals_module, "log", recorder)
    setup = Setup(2, slow_start_window=0)
    strategy = setup.strategy("least-kv-cache")
    before = fallbacks("least-kv-cache", "no_metrics")
    for _ in range(100):
        strategy.rank(setup.candidates(), RoutingRequest("m"), 1)
    assert fallbacks("least-kv-cache", "no_metrics") == before + 100
    assert sorted(w["pod"] for w in recorder.warnings) == ["st/p0", "st/p1"]
    assert {w["reason"] for w in recorder.warnings} == {"no_metrics"}
    setup.clock.now += 59.0
    for _ in range(50):
        strategy.rank(setup.candidates(), RoutingRequest("m"), 1)
    assert len(recorder.warnings) == 2
    setup.clock.now += 1.0
    for _ in range(50):
        strategy.rank(setup.candidates(), RoutingRequest("m"), 1)
    assert len(recorder.warnings) == 4


# -- weighted combinations ----------------------------------------------------------------

KNOWN = frozenset({"prefix-cache", "least-kv-cache", "least-request"})


def test_parse_weights() -> None:
    assert parse_weights("prefix-cache:3,least-kv-cache:2,least-request:2", KNOWN) == [
        ("prefix-cache", 3.0),
        ("least-kv-cache", 2.0),
        ("least-request", 2.0),
    ]
    assert parse_weights(" Prefix-Cache : 0.5 , least-request ", KNOWN) == [
        ("prefix-cache", 0.5),
        ("least-request", 1.0),
    ]
    assert canonical_name([("prefix-cache", 3.0), ("least-request", 0.5)]) == (
        "prefix-cache:3,least-request:0.5"
    )


@pytest.mark.parametrize(
    "spec",
    [
        "",
        ",",
        "prefix-cache:3,",
        "prefix-cache:3,,least-request:1",
        "unknown:1",
        "random:1",
        "prefix-cache:0",
        "prefix-cache:-1",
        "prefix-cache:nan",
        "prefix-cache:inf",
        "prefix-cache:abc",
        "prefix-cache:",
        "prefix-cache:1:2",
        "prefix-cache:1,prefix-cache:2",
    ],
)
def test_malformed_weights(spec: str) -> None:
    assert parse_weights(spec, KNOWN) is None
    assert Setup(2).catalog.resolve(spec) is None


def test_catalog_resolves_and_caches_combinations() -> None:
    catalog = Setup(2).catalog
    first = catalog.resolve("prefix-cache:3,least-kv-cache:2,least-request:2")
    assert isinstance(first, Profile) and isinstance(first.picker, MaxScorePicker)
    assert first.name == "prefix-cache:3,least-kv-cache:2,least-request:2"
    assert catalog.resolve("prefix-cache:3,least-kv-cache:2,least-request:2") is first
    assert catalog.resolve("least-request:1").name == "least-request:1"  # type: ignore[union-attr]
    assert catalog.resolve("least-latency:1,throughput:2") is not None
    assert "least-request" in catalog.names() and "session-affinity" in catalog.names()
    assert catalog.scorers() == [
        "cache-fit",
        "least-kv-cache",
        "least-latency",
        "least-request",
        "precise-prefix-cache",
        "predicted-ttft",
        "prefix-cache",
        "throughput",
    ]


def test_combination_cache_is_bounded_and_drops_evicted_series() -> None:
    setup = Setup(2, max_combinations=2, slow_start_window=0)
    names = ["least-kv-cache:1,least-request:1", "least-kv-cache:2", "least-kv-cache:3"]
    for name in names[:1]:
        setup.strategy(name).rank(setup.candidates(), RoutingRequest("m"), 1)  # no metrics
    assert fallbacks(names[0], "no_metrics") > 0
    for name in names[1:]:
        setup.strategy(name)
    assert (
        REGISTRY.get_sample_value(
            "gateway_routing_fallback_total", {"strategy": names[0], "reason": "no_metrics"}
        )
        is None
    )


def test_weighted_combination_balances_its_signals() -> None:
    setup = Setup(3)
    setup.scrape(setup.pods[0], kv=0.9, waiting=0)
    setup.scrape(setup.pods[1], kv=0.1, waiting=10)
    setup.scrape(setup.pods[2], kv=0.5, waiting=2)
    assert setup.route("least-kv-cache:1").name == "p1"
    assert setup.route("least-request:1").name == "p0"
    # kv 1/3, queue 2/3: p2 is good on both and wins the blend.
    assert setup.route("least-kv-cache:1,least-request:2").name == "p2"


def test_default_catalog_is_unchanged() -> None:
    catalog = StrategyCatalog()
    assert catalog.names() == ["random", "round-robin"]
    assert catalog.resolve("least-request") is None
    assert catalog.resolve("least-request:1") is None
    assert catalog.resolve(" Random ") is not None


# -- prefix cache -------------------------------------------------------------------------

PROMPT = "You are a helpful assistant. " * 40


def test_prefix_cache_sticks_to_the_pod_that_has_the_prefix() -> None:
    setup = Setup(4)
    for pod in setup.pods:
        setup.scrape(pod)
    request = RoutingRequest("m", prompt=PROMPT + "first question")
    first = setup.route("prefix-cache", request)
    for i in range(5):
        follow_up = RoutingRequest("m", prompt=PROMPT + f"question {i}")
        assert setup.route("prefix-cache", follow_up) is first


def test_prefix_cache_load_guard_lets_load_win() -> None:
    setup = Setup(3, prefix_max_load_gap=4)
    for pod in setup.pods:
        setup.scrape(pod)
    request = RoutingRequest("m", prompt=PROMPT)
    sticky = setup.route("prefix-cache", request)
    picks = [setup.route("prefix-cache", request) for _ in range(12)]
    # Sticky until it is more than 4 requests busier than the least busy; then the
    # others take requests (and learn the prefix), and no pod runs away with the load.
    assert picks[:4] == [sticky] * 4
    assert len({p.key for p in picks}) > 1
    counts = [setup.inflight.count(p.key) for p in setup.pods]
    assert max(counts) - min(counts) <= 5


def test_prefix_cache_unmatched_prompts_go_to_the_least_loaded() -> None:
    setup = Setup(3)
    for pod in setup.pods:
        setup.scrape(pod)
    picks = Counter(
        setup.route("prefix-cache", RoutingRequest("m", prompt=f"{i} " * 100)).name
        for i in range(30)
    )
    assert picks == {"p0": 10, "p1": 10, "p2": 10}


# -- session affinity ---------------------------------------------------------------------


def test_session_sticks_while_its_pod_is_a_candidate() -> None:
    setup = Setup(4)
    for pod in setup.pods:
        setup.scrape(pod)
    request = RoutingRequest("m", session_id="chat-1")
    home = setup.route("session-affinity", request)
    for _ in range(10):
        assert setup.route("session-affinity", request) is home  # despite its load
    others = tuple(p for p in setup.candidates() if p is not home)
    moved = setup.strategy("session-affinity").rank(others, request, 1)[0]
    assert moved is not home
    # It stays on its new pod from now on, even when the old one is back.
    assert setup.strategy("session-affinity").rank(setup.candidates(), request, 1)[0] is moved


def test_requests_without_session_use_least_request() -> None:
    setup = Setup(2)
    for pod in setup.pods:
        setup.scrape(pod)
    picks = Counter(setup.route("session-affinity").name for _ in range(10))
    assert picks == {"p0": 5, "p1": 5}


def test_session_map_is_bounded() -> None:
    setup = Setup(2, session_capacity=3)
    strategy = setup.strategy("session-affinity")
    for i in range(10):
        strategy.rank(setup.candidates(), RoutingRequest("m", session_id=f"s{i}"), 1)
    sessions = strategy.sessions  # type: ignore[attr-defined]
    assert len(sessions) == 3
    assert sessions.pod_of("s0") is None and sessions.pod_of("s9") is not None


# -- deleted pods -------------------------------------------------------------------------


def test_deleting_a_pod_drops_its_prefix_entries_and_sessions() -> None:
    setup = Setup(3)
    for pod in setup.pods:
        setup.scrape(pod)
    request = RoutingRequest("m", prompt=PROMPT, session_id="chat")
    home = setup.route("prefix-cache", request)
    affinity = setup.strategy("session-affinity")
    assert affinity.rank((home,), request, 1) == [home]
    sessions = affinity.sessions  # type: ignore[attr-defined]
    assert sessions.pod_of("chat") == home.key
    index = setup.strategy("prefix-cache").scorers[0][0].index  # type: ignore[attr-defined]
    assert index.blocks(home.key) > 0

    setup.registry.delete_pod(home.key)
    assert index.blocks(home.key) == 0
    assert sessions.pod_of("chat") is None
    remaining = setup.candidates()
    assert home not in remaining
    assert setup.strategy("prefix-cache").rank(remaining, request, 1)[0] is not home


@pytest.mark.parametrize(
    "name",
    ["least-request", "least-kv-cache", "prefix-cache", "session-affinity", "least-latency"],
)
def test_candidates_may_be_any_sequence(name: str) -> None:
    setup = Setup(3)
    for pod in setup.pods:
        setup.scrape(pod)
    subset = [setup.pods[2], setup.pods[0]]  # e.g. inside Envoy's subset hint
    request = RoutingRequest("m", prompt=PROMPT, session_id="s")
    for _ in range(20):
        ranked = setup.strategy(name).rank(subset, request, 2)
        assert sorted(p.name for p in ranked) == ["p0", "p2"]


def test_least_latency_spreads_over_pods_whose_latency_differs_by_noise():
    setup = Setup(3, slow_start_window=0)
    for pod in setup.pods:
        setup.store.mark_routable(pod.key)
    # Two scrapes so recent means exist; TTFT 20.0, 20.2 and 20.4 ms: noise. The engines
    # report as running what is in flight, as they do between scrapes.
    for k in (1, 2):
        for i, pod in enumerate(setup.pods):
            ttft = 0.020 + 0.0002 * i
            setup.store.record(
                pod.key,
                EngineSample(
                    running=6,
                    waiting=0,
                    ttft_sum=ttft * 10 * k,
                    ttft_count=10.0 * k,
                    e2e_sum=0.1 * k,
                    e2e_count=1.0 * k,
                ),
            )
        setup.clock.now += 0.5
    counts: Counter[str] = Counter()
    held: list[Pod] = []
    for _ in range(300):  # a steady 6 requests in flight
        pod = setup.route("least-latency")
        counts[pod.name] += 1
        held.append(pod)
        if len(held) > 6:
            setup.inflight.release("m", held.pop(0))
    assert set(counts) == {"p0", "p1", "p2"}, counts
    assert min(counts.values()) >= 80, counts


# -- pickers and profiles of a routing config -----------------------------------------------


def configured(text: str, **setup_args: Any) -> Setup:
    return Setup(routing=parse_routing_config(yaml.safe_load(text), "test"), **setup_args)


def test_weighted_random_spreads_in_proportion_to_the_scores() -> None:
    setup = configured(
        "profiles: [{name: kv-spread, picker: weighted-random, scorers: [least-kv-cache]}]", n=3
    )
    for pod, kv in zip(setup.pods, (0.0, 0.5, 1.0), strict=True):
        setup.scrape(pod, kv=kv)  # free: 1.0, 0.5, 0.0
    strategy = setup.strategy("kv-spread")
    picks = Counter(
        strategy.rank(setup.candidates(), RoutingRequest("m"), 1)[0].name for _ in range(3000)
    )
    assert set(picks) == {"p0", "p1"}, picks  # a pod scoring 0 is never drawn
    assert 1.7 < picks["p0"] / picks["p1"] < 2.3, picks  # 1.0 : 0.5
    ranked = strategy.rank(setup.candidates(), RoutingRequest("m"), 3)
    assert sorted(p.name for p in ranked) == ["p0", "p1", "p2"] and ranked[-1].name == "p2"


def test_a_configured_profile_filters_and_keeps_sessions() -> None:
    setup = configured(
        "profiles: [{name: sticky, session-affinity: true, filters: [endpoint-subset], "
        "scorers: [least-kv-cache]}]"
    )
    for pod in setup.pods:
        setup.scrape(pod)
    strategy = setup.strategy("sticky")
    request = RoutingRequest("m", session_id="chat")
    home = strategy.rank(setup.candidates(), request, 1)[0]
    setup.scrape(home, kv=0.99)  # now the worst by score, yet the session stays
    assert {strategy.rank(setup.candidates(), request, 1)[0].name for _ in range(10)} == {home.name}
    # Its own filter drops the session's pod: the session moves, within the subset.
    others = frozenset(p.address for p in setup.pods if p is not home)
    moved = strategy.rank(setup.candidates(), replace(request, subset=others), 1)[0]
    assert moved is not home and moved.address in others
    with pytest.raises(NoCandidates, match="inside the requested endpoint subset"):
        strategy.rank(setup.candidates(), replace(request, subset=frozenset()), 1)


def test_plugins_find_what_the_server_shares_with_them() -> None:
    plugins = PLUGINS.copy()
    owned = object()  # e.g. the KV-event index the server fills
    seen: list[object] = []

    def factory(env: PluginEnv) -> Scorer:
        seen.append(env.shared("the-index", object))
        return KVCacheScorer()

    plugins.register_scorer("uses-index", factory)
    Setup(plugins=plugins, shared={"the-index": owned})
    Setup(plugins=plugins)
    assert seen[0] is owned and seen[1] is not owned
