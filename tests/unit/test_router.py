"""The router: states to errors, strategy choice, pick-time checks, in-flight counting."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway_extproc.errors import GatewayError
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.catalog import StrategyCatalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.plugins import Filter
from gateway_extproc.routing.router import Router

PODS = [Pod(f"p{i}", f"10.0.0.{i}:8000", ("m",)) for i in range(3)]


def make_router(fallbacks: int = 0, default: str = "random") -> Router:
    registry = ModelRegistry()
    registry.replace_all(PODS)
    return Router(
        registry, StrategyCatalog(), default, InFlightCounter(), fallback_endpoints=fallbacks
    )


def test_round_robin_cycles_through_every_pod_in_turn():
    router = make_router(default="round-robin")
    strategy = router.strategy(None)
    picks = [router.route(RoutingRequest("m"), strategy).pod.name for _ in range(6)]
    assert picks == ["p0", "p1", "p2", "p0", "p1", "p2"]


def test_random_spreads_over_every_pod():
    router = make_router()
    strategy = router.strategy("random")
    counts = Counter(router.route(RoutingRequest("m"), strategy).pod.name for _ in range(300))
    assert set(counts) == {"p0", "p1", "p2"}
    assert min(counts.values()) > 50


def test_strategy_header_is_case_insensitive_and_unknown_names_are_400():
    router = make_router()
    assert router.strategy(" Round-Robin ").name == "round-robin"
    with pytest.raises(GatewayError) as caught:
        router.strategy("nope")
    assert caught.value.code == "invalid_routing_strategy"


def test_unknown_default_strategy_fails_at_start():
    with pytest.raises(ValueError, match="unknown default strategy"):
        make_router(default="nope")


def test_fallback_endpoints_list_distinct_pods_after_the_pick():
    router = make_router(fallbacks=2)
    decision = router.route(RoutingRequest("m"), router.strategy(None))
    addresses = decision.destination.split(",")
    assert len(addresses) == 3 and len(set(addresses)) == 3
    assert addresses[0] == decision.pod.address
    assert router.inflight.count(decision.pod.key) == 1  # only the pick is counted


class StaleStrategy:
    """Ranks from a snapshot taken before a pod turned terminating."""

    name = "stale"

    def __init__(self, pod: Pod) -> None:
        self.pod = pod

    def rank(self, candidates, request, count):
        return [self.pod] if self.pod not in candidates else list(candidates)[:count]


def test_a_pod_that_turned_terminating_after_the_snapshot_is_never_chosen():
    router = make_router()
    router.registry.upsert_pod(Pod("p0", "10.0.0.0:8000", ("m",), terminating=True))
    for _ in range(20):
        decision = router.route(RoutingRequest("m"), StaleStrategy(PODS[0]))
        assert decision.pod.name != "p0"
        router.release(decision)


def test_release_returns_the_count_to_zero():
    router = make_router()
    decisions = [router.route(RoutingRequest("m"), router.strategy(None)) for _ in range(5)]
    assert router.inflight.total() == 5
    for decision in decisions:
        router.release(decision)
    assert router.inflight.total() == 0


# -- request filters ------------------------------------------------------------------------


class DropPods(Filter):
    """Drops the pods named; a rule, or (fail_open) a preference."""

    name = "drop-pods"

    def __init__(self, names: set[str], *, fail_open: bool = False) -> None:
        self.names = names
        self.fail_open = fail_open

    def filter(self, candidates, request):
        return tuple(p for p in candidates if p.name not in self.names)


def filtered_router(*filters: Filter) -> Router:
    registry = ModelRegistry()
    registry.replace_all(PODS)
    catalog = StrategyCatalog(request_filters=filters)
    return Router(registry, catalog, "random", InFlightCounter())


def test_request_filters_drop_candidates_for_every_strategy():
    router = filtered_router(DropPods({"p1"}))
    for name in ("random", "round-robin"):
        strategy = router.strategy(name)
        picks = {router.route(RoutingRequest("m"), strategy).pod.name for _ in range(30)}
        assert picks == {"p0", "p2"}, name


def test_a_filter_that_keeps_no_pod_is_503_naming_it_unless_it_fails_open():
    router = filtered_router(DropPods({"p0", "p1", "p2"}))
    with pytest.raises(GatewayError) as caught:
        router.route(RoutingRequest("m"), router.strategy(None))
    assert caught.value.status == 503 and caught.value.code == "no_ready_pods"
    assert "has no ready pod passing the drop-pods filter" in caught.value.message
    assert router.inflight.total() == 0
    preferring = filtered_router(DropPods({"p0", "p1", "p2"}, fail_open=True), DropPods({"p2"}))
    picks = {
        preferring.route(RoutingRequest("m"), preferring.strategy(None)).pod.name for _ in range(30)
    }
    assert picks == {"p0", "p1"}
