"""Routing strategies, end to end: what a user of the gateway notices when pods differ.

Real processes throughout: three simulated engines, a processor of this module's own
(engine metrics scraped every 0.1 s, stale after 1 s, a 6 s slow-start window; see
strategy_stack.py) and a real Envoy on envoy/envoy.yaml. Every request goes through
Envoy; the pod that served it is read from the simulator's `x-simulator-pod` header.

- a slow pod gets clearly less traffic from `least-request` and `least-latency` than from
  `random`, which spreads evenly whatever the pods' speed; and from the default
  (`predicted-latency`, no header) also at light load, where in-flight counts cannot
  tell it from the others, by the time to first token the processor measures itself;
- with every engine's metrics endpoint broken, metric-driven strategies still answer
  every request and count their fallbacks;
- a pod added while the others are busy ramps up: a small share, never none, never all;
- `prefix-cache` keeps a shared prefix on the pod that holds it until that pod is
  overloaded, then new requests spill to others;
- bad `routing-strategy` values are 400 `invalid_routing_strategy`; a weighted
  combination routes.

Tests run in file order and each leaves the engines without faults and nothing in
flight. Shares are asserted with margins wide enough for a noisy 2-core machine; each
assertion message carries the measured shares.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.stack import Response, dictionary_seen, poll
from tests.integration.strategy_stack import (
    FLEET_MODEL,
    LATENCY_MODEL,
    PREFIX_MODEL,
    RAMP_MODEL,
    SLOW_START_WINDOW,
    Fleet,
    chat_doc,
    drive,
    drive_all,
    fallbacks_by_strategy,
    hold_streams,
    in_flight,
    log_count,
    pod_name,
    reset_faults,
    running_fleet,
    send_chat,
    served_by,
    set_faults,
    shares,
    wait_metrics_flowing,
    wait_scraped,
)

# Load for the share measurements: enough clients that pods hold several requests at
# once, few enough that two cores also serve Envoy, the processor and three engines.
CONCURRENCY = 6
SHARE_REQUESTS = 150
LOAD_BUDGET = 30.0  # seconds any one load run may take before the test fails
REPLY_TOKENS = 8  # 20 ms + 7 x 5 ms = 55 ms of engine time per request at normal speed
SLOW_FACTOR = 8.0
SLOW = "c"  # the engine made slow

# Strategies that read engine metrics (and so must degrade when they are missing), with a
# weighted combination; prefix-cache and session-affinity also route without metrics.
METRIC_STRATEGIES = ("least-request", "least-kv-cache", "least-latency", "throughput")
WEIGHTED = "prefix-cache:3,least-kv-cache:2,least-request:2"
DEGRADING = (*METRIC_STRATEGIES, "session-affinity", WEIGHTED)


@pytest.fixture(scope="module")
def fleet(log_dir: Path, child_env: dict[str, str]) -> Iterator[Fleet]:
    with running_fleet(log_dir, child_env) as fleet:
        yield fleet


@pytest.fixture
def healthy(fleet: Fleet) -> Iterator[Fleet]:
    """The fleet, put back afterwards: no fault on any engine, metrics flowing again."""
    yield fleet
    for pod in fleet.engines.values():
        reset_faults(pod)
    wait_metrics_flowing(fleet)


def load_shares(fleet: Fleet, strategy: str) -> tuple[dict[str, float], list[Response]]:
    """Shares of fleet-model traffic per engine under concurrent load with `strategy`."""
    responses = drive_all(
        lambda _: send_chat(fleet.gateway.port, FLEET_MODEL, strategy, max_tokens=REPLY_TOKENS),
        total=SHARE_REQUESTS,
        concurrency=CONCURRENCY,
        budget=LOAD_BUDGET,
    )
    assert [r.status for r in responses] == [200] * len(responses), Counter(
        r.status for r in responses
    )
    return shares(fleet, responses), responses


# -- a slow pod -----------------------------------------------------------------------


@pytest.fixture
def slow_pod(fleet: Fleet) -> Iterator[str]:
    """Engine c answers 8x slower; every engine has served a few requests at its current
    speed (sent to it directly), so recent latencies in its metrics tell the truth, and
    the processor has scraped them."""
    set_faults(fleet.engines[SLOW], slow_factor=SLOW_FACTOR)
    try:
        direct = [pod for pod in fleet.engines.values() for _ in range(3)]
        drive_all(
            lambda i: send_chat(direct[i].port, FLEET_MODEL, "", max_tokens=REPLY_TOKENS),
            total=len(direct),
            concurrency=len(direct),
            budget=LOAD_BUDGET,
        )
        wait_scraped(fleet)
        yield SLOW
    finally:
        reset_faults(fleet.engines[SLOW])


def test_random_spreads_evenly_even_onto_a_slow_pod(fleet: Fleet, slow_pod: str) -> None:
    seen, _ = load_shares(fleet, "random")

    print(f"random: {seen}")
    # A closed loop of uniform picks: each pod expects 1/3 whatever its speed (sd 0.038
    # over 150 requests; 0.18 and 0.5 are over 4 sd away).
    assert all(0.18 <= share <= 0.5 for share in seen.values()), seen


@pytest.mark.parametrize("strategy", ["least-request", "least-latency"])
def test_load_aware_strategies_send_a_slow_pod_clearly_less(
    fleet: Fleet, slow_pod: str, strategy: str
) -> None:
    seen, _ = load_shares(fleet, strategy)

    print(f"{strategy}: {seen}")
    fast = [share for engine, share in seen.items() if engine != slow_pod]
    # Random gives the slow pod a third (at least 0.18 above); here it gets a small
    # fraction of what a fast pod gets on average.
    assert seen[slow_pod] <= 0.15, seen
    assert seen[slow_pod] <= sum(fast) / len(fast) / 3, seen


def test_the_default_sends_a_slow_pod_little_at_light_load(healthy: Fleet) -> None:
    """Requests one at a time, streamed, no routing-strategy header: every pod has 0 in
    flight at every pick, so only the latencies the processor measured on earlier
    responses tell engine c is 4x slower."""
    fleet = healthy
    set_faults(fleet.engines[SLOW], slow_factor=4.0)

    def one(i: int) -> Response:
        return send_chat(
            fleet.gateway.port, LATENCY_MODEL, "", f"question {i}", stream=True, max_tokens=4
        )

    learning = [one(i) for i in range(30)]
    measured = [one(i) for i in range(30, 120)]
    statuses = Counter(r.status for r in learning + measured)
    assert statuses == {200: len(learning) + len(measured)}, statuses

    seen = shares(fleet, measured)
    print(f"default, one request at a time: {seen}")
    # A third each if nothing told the pods apart (random and least-request alike at
    # this load); the default gives the slow pod well under half of that.
    assert seen[SLOW] < 0.15, seen


# -- broken metrics -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["error", "garbage", "hang"])
def test_metric_strategies_answer_every_request_when_no_metrics_can_be_read(
    healthy: Fleet, mode: str
) -> None:
    fleet = healthy
    warnings_before = log_count(fleet.process, "routing_fallback")
    for pod in fleet.engines.values():
        set_faults(pod, metrics=mode)

    # The last good metrics stay usable until they are stale, pod by pod (1 s, longer
    # when a loaded machine stretches the scrape rounds): wait until no pod has any, that
    # is until every metric-driven strategy falls back on each of a few picks in a row.
    def every_pick_falls_back() -> dict[str, int]:
        before = fallbacks_by_strategy(fleet.processor)
        for strategy in DEGRADING:
            for _ in range(2):
                send_chat(fleet.gateway.port, FLEET_MODEL, strategy, max_tokens=1)
        after = fallbacks_by_strategy(fleet.processor)
        return {s: after[s] - before[s] for s in DEGRADING}

    poll(
        "every metric-driven pick falls back once all metrics are stale",
        every_pick_falls_back,
        lambda rises: all(rise >= 2 for rise in rises.values()),
    )
    before = fallbacks_by_strategy(fleet.processor)
    per_strategy = 6
    strategies = [s for s in DEGRADING for _ in range(per_strategy)] + ["prefix-cache"] * 6

    responses = drive_all(
        lambda i: send_chat(
            fleet.gateway.port,
            FLEET_MODEL,
            strategies[i],
            f"request {i}",
            max_tokens=2,
        ),
        total=len(strategies),
        concurrency=CONCURRENCY,
        budget=LOAD_BUDGET,
    )

    statuses = Counter(r.status for r in responses)
    assert statuses == {200: len(strategies)}, statuses
    assert {fleet.engine_of(served_by(r)) for r in responses} <= set(fleet.engines)
    after = fallbacks_by_strategy(fleet.processor)
    rises = {s: after[s] - before[s] for s in DEGRADING}
    print(f"metrics={mode}: fallback rises {rises}")
    # Every pick of a metric-driven strategy was made without metrics, and counted.
    assert all(rise >= per_strategy for rise in rises.values()), rises
    # ...but warned about at most once per pod per minute, not once per request.
    new_warnings = log_count(fleet.process, "routing_fallback") - warnings_before
    assert new_warnings <= len(fleet.engines), new_warnings


# -- a pod added under load ------------------------------------------------------------


@pytest.fixture
def late_pod(healthy: Fleet) -> Iterator[str]:
    """Engine c, about to join ramp-model; its metrics endpoint still fails, as a
    warming-up engine's does, so the processor knows nothing of its load yet."""
    fleet = healthy
    set_faults(fleet.engines["c"], metrics="error")
    before = dictionary_seen(fleet.processor)
    yield "c"
    fleet.models.restore()
    poll(
        "the processor is back on the original models file",
        lambda: dictionary_seen(fleet.processor),
        lambda seen: seen == before,
    )


def test_a_pod_added_under_load_ramps_up_instead_of_taking_everything(
    healthy: Fleet, late_pod: str
) -> None:
    fleet = healthy
    port = fleet.gateway.port
    # The established pods are busy with long streams: by in-flight count alone, an
    # idle newcomer would win every pick.
    doc = chat_doc(RAMP_MODEL, "Tell me everything.", max_tokens=5000)
    busy = hold_streams(port, 4, doc, {"routing-strategy": "least-request"})
    try:
        assert {fleet.engine_of(s.pod) for s in busy} == {"a", "b"}
        models = fleet.models.load()
        ramp = next(m for m in models["models"] if m["name"] == RAMP_MODEL)
        new_name = pod_name(RAMP_MODEL, late_pod)
        ramp["pods"].append({"name": new_name, "address": fleet.engines[late_pod].address})
        fleet.models.write(models)
        poll(
            "the processor routes ramp-model to the added pod too",
            lambda: [
                p["name"]
                for p in fleet.processor.get("/debug/models").json()["models"][RAMP_MODEL]["pods"]
                if p["routable"]
            ],
            lambda names: new_name in names,
        )

        # Measure well inside the slow-start window (the pod's weight ramps from 0.1 to 1
        # over it, so over the first half its expected share is about 0.11 of 3 pods).
        window = SLOW_START_WINDOW / 2
        samples = drive(
            lambda _: send_chat(port, RAMP_MODEL, "least-request", max_tokens=REPLY_TOKENS),
            total=10_000,
            concurrency=CONCURRENCY,
            budget=window,
        )
    finally:
        for stream in busy:
            stream.close()

    responses = [s.response for s in samples]
    assert Counter(r.status for r in responses) == {200: len(responses)}
    seen = shares(fleet, responses)
    halves = [
        shares(fleet, [s.response for s in samples if (s.started < window / 2) == first])
        for first in (True, False)
    ]
    print(f"slow start over {len(responses)} requests: {seen}; by half: {halves}")
    assert len(responses) >= 60, len(responses)
    assert seen[late_pod] > 0, seen
    assert seen[late_pod] <= 0.6 * min(seen["a"], seen["b"]), seen
    poll(
        "the held streams are released",
        lambda: in_flight(fleet.processor, RAMP_MODEL),
        lambda count: count == 0,
    )


# -- prefix cache ----------------------------------------------------------------------

# About 40 blocks of the processor's 128-character prefix blocks, shared by every prompt.
SHARED_PREFIX = " ".join(f"clause-{i} of the shared system prompt;" for i in range(140))


def prefix_chat(fleet: Fleet, question: str) -> Response:
    """A short request whose prompt starts with the shared prefix, under prefix-cache."""
    content = f"{SHARED_PREFIX}\n{question}"
    return send_chat(fleet.gateway.port, PREFIX_MODEL, "prefix-cache", content, max_tokens=2)


def test_prefix_cache_sticks_to_the_holder_until_it_is_overloaded(healthy: Fleet) -> None:
    fleet = healthy
    sequential = [prefix_chat(fleet, f"question {i}?") for i in range(8)]
    assert [r.status for r in sequential] == [200] * 8
    holders = {fleet.engine_of(served_by(r)) for r in sequential}
    assert len(holders) == 1, [fleet.engine_of(served_by(r)) for r in sequential]
    (holder,) = holders

    # A burst of long requests with the same prefix: the holder takes them while its
    # load stays near the others', then the rest spill.
    doc = chat_doc(PREFIX_MODEL, f"{SHARED_PREFIX}\nwrite a long essay", max_tokens=5000)
    with contextlib.ExitStack() as cleanup:
        busy = hold_streams(fleet.gateway.port, 14, doc, {"routing-strategy": "prefix-cache"})
        for stream in busy:
            cleanup.callback(stream.close)
        burst = Counter(fleet.engine_of(s.pod) for s in busy)
        # While the holder is overloaded, new requests with the prefix go elsewhere.
        spilled = [prefix_chat(fleet, f"follow-up {i}?") for i in range(6)]

    print(
        f"prefix holder {holder}; burst {dict(burst)}; spilled to "
        f"{[fleet.engine_of(served_by(r)) for r in spilled]}"
    )
    assert burst[holder] == max(burst.values()) and burst[holder] < len(busy), burst
    assert [r.status for r in spilled] == [200] * len(spilled)
    assert holder not in {fleet.engine_of(served_by(r)) for r in spilled}
    poll(
        "the held streams are released",
        lambda: in_flight(fleet.processor, PREFIX_MODEL),
        lambda count: count == 0,
    )


# -- strategy names ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fastest-ever", "prefix-cache:0"])
def test_a_bad_routing_strategy_is_400(fleet: Fleet, name: str) -> None:
    response = send_chat(fleet.gateway.port, FLEET_MODEL, name)

    assert response.status == 400, response.body
    assert response.headers["content-type"] == "application/json"
    assert response.error_code() == "invalid_routing_strategy"
    assert response.json()["error"]["param"] == "routing-strategy"
    assert "x-simulator-pod" not in response.headers


def test_a_weighted_combination_routes(fleet: Fleet) -> None:
    responses = [send_chat(fleet.gateway.port, FLEET_MODEL, WEIGHTED) for _ in range(6)]

    assert [r.status for r in responses] == [200] * 6, [r.body for r in responses]
    assert all(fleet.engine_of(served_by(r)) in fleet.engines for r in responses)
