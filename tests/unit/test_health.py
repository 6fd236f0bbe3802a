"""Passive health: which outcomes count, ejection with backoff, the half-open probe, the
cap on how many pods may be out, and what routing and sessions do with it. A fake
clock drives every timing."""

from __future__ import annotations

import orjson
import pytest
from prometheus_client import REGISTRY

from gateway_extproc.extproc.session import Session, SessionConfig
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.catalog import StrategyCatalog
from gateway_extproc.routing.health import HealthPolicy, PodHealth, Verdict, verdict
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.router import Router
from tests import frames

PODS = tuple(Pod(f"h{i}", f"10.1.0.{i}:8000", ("m",)) for i in range(4))
POLICY = HealthPolicy(eject_after=3, base_seconds=10.0, max_seconds=35.0, max_fraction=0.5)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_health(
    clock: Clock, policy: HealthPolicy = POLICY, busy: dict[str, int] | None = None
) -> PodHealth:
    in_flight = busy if busy is not None else {}
    return PodHealth(policy, in_flight=lambda key: in_flight.get(key, 0), clock=clock)


def fail(health: PodHealth, key: str, times: int = 1) -> None:
    for _ in range(times):
        health.failure(key, "status_500")


def ejections(pod: str) -> float:
    return REGISTRY.get_sample_value("gateway_pod_ejections_total", {"pod": pod}) or 0.0


def ejected_now() -> float:
    return REGISTRY.get_sample_value("gateway_pods_ejected") or 0.0


# -- what counts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "details", "expected"),
    [
        (200, "via_upstream", Verdict.SUCCESS),
        (400, "via_upstream", Verdict.SUCCESS),  # the engine works; the request was bad
        (429, "via_upstream", Verdict.SUCCESS),
        (500, "via_upstream", Verdict.FAILURE),
        (503, "via_upstream", Verdict.FAILURE),
        (503, "upstream_reset_before_response_started{connection_failure}", Verdict.FAILURE),
        (504, "upstream_per_try_idle_timeout", Verdict.FAILURE),
        (504, "upstream_response_timeout", Verdict.FAILURE),
        (413, "request_payload_too_large", Verdict.NEUTRAL),  # Envoy's, not the pod's
        (503, "ext_proc_error_gRPC_error_14", Verdict.NEUTRAL),
        (502, None, Verdict.FAILURE),  # no details asked for: every 5xx counts
        (200, None, Verdict.SUCCESS),
    ],
)
def test_what_a_response_says_about_its_pod(status, details, expected):
    assert verdict(status, details)[0] is expected


def test_the_reason_names_envoys_details_without_their_flags():
    assert verdict(503, "upstream_reset_before_response_started{remote_reset}") == (
        Verdict.FAILURE,
        "upstream_reset_before_response_started",
    )


# -- ejection and backoff -------------------------------------------------------------


def test_a_pod_is_ejected_after_consecutive_failures_only(clock):
    health = make_health(clock)
    fail(health, "h0", 2)
    health.success("h0")  # the run is broken
    fail(health, "h0", 2)
    assert health.healthy("h0")
    before = ejections("h0")
    fail(health, "h0")
    assert not health.healthy("h0")
    assert ejections("h0") == before + 1
    assert health.describe("h0")["state"] == "ejected"


def test_an_ejection_lasts_longer_each_time_in_a_row_up_to_the_cap(clock):
    health = make_health(clock)
    fail(health, "h0", 3)
    lengths = []
    for _ in range(4):
        start = clock.now
        while not health.healthy("h0"):
            clock.now += 1.0
        lengths.append(clock.now - start)
        health.failure("h0", "status_500")  # the probe fails: out again at once
        assert not health.healthy("h0")
    assert lengths == [10.0, 20.0, 35.0, 35.0]


def test_a_successful_probe_lets_the_pod_back_and_resets_the_backoff(clock):
    health = make_health(clock)
    gauge = ejected_now()
    fail(health, "h0", 3)
    assert ejected_now() == gauge + 1
    clock.now += 10.0
    health.failure("h0", "status_500")  # failed probe: 20 s now
    clock.now += 20.0
    assert health.healthy("h0")  # half-open
    assert health.describe("h0")["state"] == "half_open"
    health.success("h0")
    assert health.describe("h0") == {"state": "healthy"}
    assert ejected_now() == gauge
    fail(health, "h0", 3)  # a new run of failures starts from the base time again
    clock.now += 10.0
    assert health.healthy("h0")


def test_outcomes_while_ejected_neither_extend_nor_end_the_ejection(clock):
    health = make_health(clock)
    fail(health, "h0", 3)
    clock.now += 5.0
    fail(health, "h0", 10)  # requests sent before the ejection, ending now
    health.success("h0")  # one that started earlier and went well
    assert not health.healthy("h0")
    clock.now += 5.0
    assert health.healthy("h0")


def test_a_half_open_pod_takes_one_probe_at_a_time(clock):
    busy: dict[str, int] = {}
    health = make_health(clock, busy=busy)
    fail(health, "h0", 3)
    clock.now += 10.0
    busy["h0"] = 1  # the probe (or an older request) is still in flight
    assert not health.healthy("h0")
    busy["h0"] = 0
    assert health.healthy("h0")


def test_eject_after_zero_turns_passive_health_off(clock):
    health = make_health(clock, HealthPolicy(eject_after=0))
    fail(health, "h0", 100)
    assert health.healthy("h0")


def test_a_refused_scrape_counts_only_at_the_serving_address(clock):
    health = make_health(clock)
    separate = Pod("h9", "10.1.0.9:8000", ("m",), metrics_address="10.1.0.9:9000")
    same = Pod("h8", "10.1.0.8:8000", ("m",))
    for _ in range(3):
        health.scrape_unreachable(separate)
        health.scrape_unreachable(same)
    assert health.healthy("h9")
    assert not health.healthy("h8")


def test_unanswered_scrapes_eject_a_hung_pod_as_refused_ones_do(clock):
    health = make_health(clock)
    hung = Pod("h7", "10.1.0.7:8000", ("m",))
    for _ in range(3):
        health.scrape_unreachable(hung, "timeout")
    assert not health.healthy("h7")


def test_a_deleted_pod_leaves_no_state_or_series(clock):
    health = make_health(clock)
    gauge = ejected_now()
    fail(health, "h3", 3)
    health.forget(PODS[3])
    assert health.healthy("h3")
    assert ejected_now() == gauge
    assert REGISTRY.get_sample_value("gateway_pod_ejections_total", {"pod": "h3"}) is None


# -- the candidate filter ----------------------------------------------------------------


def test_usable_leaves_out_ejected_pods_within_the_max_fraction(clock):
    health = make_health(clock)
    fail(health, "h1", 3)
    assert health.usable(PODS) == (PODS[0], PODS[2], PODS[3])
    clock.now += 1.0
    fail(health, "h2", 3)  # two of four: still within half
    assert health.usable(PODS) == (PODS[0], PODS[3])
    clock.now += 1.0
    fail(health, "h3", 3)  # three of four: the one back soonest (h1) is let in again
    assert health.usable(PODS) == (PODS[0], PODS[1])


def test_at_least_one_pod_may_be_ejected_and_when_all_are_every_pod_is_used(clock):
    health = make_health(clock, HealthPolicy(eject_after=1, max_fraction=0.1))
    health.failure("h0", "status_500")
    assert health.usable(PODS[:2]) == (PODS[1],)
    health.failure("h1", "status_500")
    assert health.usable(PODS[:2]) == PODS[:2]


# -- routing and sessions ----------------------------------------------------------------


def make_router(clock: Clock, pods: tuple[Pod, ...] = PODS[:3]) -> Router:
    registry = ModelRegistry()
    registry.replace_all(pods)
    inflight = InFlightCounter()
    health = PodHealth(POLICY, in_flight=inflight.count, clock=clock)
    return Router(registry, StrategyCatalog(), "round-robin", inflight, health=health)


def test_the_router_sends_nothing_to_an_ejected_pod_until_it_recovers(clock):
    router = make_router(clock)
    fail(router.health, "h1", 3)
    strategy = router.strategy(None)

    def picks(n: int) -> list[str]:
        names = []
        for _ in range(n):
            decision = router.route(RoutingRequest("m"), strategy)
            router.release(decision)
            names.append(decision.pod.name)
        return names

    assert "h1" not in picks(9)
    clock.now += 10.0
    assert "h1" in picks(3)  # the probe


def routed_session(router: Router) -> Session:
    session = Session(router, SessionConfig())
    session.handle(frames.request_headers(path="/v1/completions"))
    session.handle(frames.request_body(orjson.dumps({"model": "m", "prompt": "hi"})))
    return session


def observed_end(status: int, details: str):
    """The last response frame as envoy.yaml's observer filter sends it."""
    frame = frames.response_body(b"...", end_of_stream=True)
    attributes = frame.attributes["envoy.filters.http.ext_proc"]
    attributes["response.code"] = status
    attributes["response.code_details"] = details
    return frame


@pytest.mark.parametrize(
    ("status", "details", "ejected"),
    [
        (503, "upstream_reset_before_response_started{connection_failure}", True),
        (500, "via_upstream", True),
        (400, "via_upstream", False),
        (413, "request_payload_too_large", False),
    ],
)
def test_sessions_report_how_responses_ended(clock, status, details, ejected):
    router = make_router(clock, pods=PODS[:1])
    for _ in range(3):
        routed_session(router).handle(observed_end(status, details))
    assert router.health.healthy("h0") is not ejected


def test_cancelled_requests_say_nothing_about_the_pod(clock):
    router = make_router(clock, pods=PODS[:1])
    for _ in range(3):
        routed_session(router).close()
    assert router.health.describe("h0") == {"state": "healthy"}
