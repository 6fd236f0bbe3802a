"""Saturation: a pod is full by its engine's waiting queue or by our in-flight count, and
the routing filter drops full pods (handing back the same tuple when none is full)."""

from __future__ import annotations

from gateway_extproc.flowcontrol.saturation import NotSaturated, SaturationDetector
from gateway_extproc.metrics.parser import EngineSample
from gateway_extproc.metrics.store import MetricsStore
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.catalog import StrategyCatalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.router import Router

PODS = tuple(Pod(f"p{i}", f"10.0.0.{i}:8000", ("m",)) for i in range(3))


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def detector(queue: int = 2, inflight: int = 2):
    clock = Clock()
    store = MetricsStore(staleness=2.0, clock=clock)
    counter = InFlightCounter()
    return (
        SaturationDetector(store, counter, queue_threshold=queue, max_inflight=inflight),
        store,
        counter,
        clock,
    )


def test_a_pod_is_full_when_its_in_flight_count_reaches_the_limit():
    saturation, _, counter, _ = detector(queue=0, inflight=2)
    counter.acquire("m", PODS[0])
    assert not saturation.is_saturated(PODS[0])
    counter.acquire("m", PODS[0])
    assert saturation.is_saturated(PODS[0])
    assert saturation.has_room(PODS)
    assert not saturation.has_room(PODS[:1])
    counter.release("m", PODS[0])
    assert not saturation.is_saturated(PODS[0])


def test_a_pod_is_full_when_its_engine_queue_is_above_the_threshold():
    saturation, store, _, clock = detector(queue=2, inflight=0)
    store.record(PODS[1].key, EngineSample(waiting=2))
    assert not saturation.is_saturated(PODS[1])
    store.record(PODS[1].key, EngineSample(waiting=3))
    assert saturation.is_saturated(PODS[1])
    # Stale metrics say nothing: the pod is no longer judged full by them.
    clock.now += 10
    assert not saturation.is_saturated(PODS[1])


def test_zero_turns_both_checks_off():
    saturation, store, counter, _ = detector(queue=0, inflight=0)
    assert not saturation.enabled
    for _ in range(100):
        counter.acquire("m", PODS[0])
    store.record(PODS[0].key, EngineSample(waiting=1000))
    assert not saturation.is_saturated(PODS[0])


def test_the_filter_drops_full_pods_and_keeps_the_tuple_when_none_is_full():
    saturation, _, counter, _ = detector(queue=0, inflight=1)
    assert saturation.filter(PODS) is PODS
    counter.acquire("m", PODS[2])
    kept = saturation.filter(PODS)
    assert kept == PODS[:2]
    assert saturation.filter(PODS) is kept  # the same answer until something changes
    counter.release("m", PODS[2])
    assert saturation.filter(PODS) is PODS


def test_the_router_skips_full_pods_and_routes_anyway_when_all_are_full():
    saturation, _, counter, _ = detector(queue=0, inflight=1)
    registry = ModelRegistry()
    registry.replace_all(PODS)
    router = Router(
        registry, StrategyCatalog(), "round-robin", counter, filters=(NotSaturated(saturation),)
    )
    strategy = router.strategy(None)
    picks = [router.route(RoutingRequest("m"), strategy).pod.name for _ in range(3)]
    assert sorted(picks) == ["p0", "p1", "p2"]  # one each: a full pod is never picked
    # All full (flow control would have held the request): a filter never makes an error.
    assert router.route(RoutingRequest("m"), strategy).pod in PODS
