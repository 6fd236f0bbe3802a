"""Passive health end to end: a failing pod stops attracting traffic, and a recovered
one gets it back.

Three simulated engines behind a processor of this module's own (passive health tuned
for a test: ejected after 3 failures, for 1 s doubling up to 4 s) and a real Envoy on
envoy/envoy.yaml, its per-try idle timeout cut from 120 s to 1 s so that a hung engine
shows within a test. One engine fails in one of three ways: killed (Envoy cannot
connect), answering 500 to every request, or hung (it accepts a request and sends
nothing). Load-aware strategies used to prefer such a pod (it fails fast, so it has few
requests in flight): before passive health a killed engine got about 80% of
`least-request` traffic and 77% of `prefix-cache` traffic. Each test measures the failing
pod's share, then lets the engine recover and waits until it is served again.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway_extproc.devtools import localstack
from tests.integration.stack import Response, poll
from tests.integration.strategy_stack import (
    FLEET_MODEL,
    Fleet,
    drive_all,
    reset_faults,
    running_fleet,
    send_chat,
    set_faults,
    wait_metrics_flowing,
)

FAILING = "c"
EJECT_AFTER = 3
PROCESSOR_ARGS = [
    "--eject-after",
    str(EJECT_AFTER),
    "--eject-base-seconds",
    "1",
    "--eject-max-seconds",
    "4",
]
PER_TRY_IDLE_TIMEOUT = "1s"
CONCURRENCY = 6
REQUESTS = 150
LOAD_BUDGET = 60.0  # seconds a load run may take before the test fails
REPLY_TOKENS = 8


@pytest.fixture(scope="module")
def fleet(log_dir: Path, child_env: dict[str, str]) -> Iterator[Fleet]:
    doc = yaml.safe_load(localstack.ENVOY_CONFIG.read_text(encoding="utf-8"))
    for route in localstack.pod_routes(doc):
        route["retry_policy"]["per_try_idle_timeout"] = PER_TRY_IDLE_TIMEOUT
    config = log_dir / "envoy-health-bootstrap.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    with running_fleet(
        log_dir, child_env, name="health", processor_args=PROCESSOR_ARGS, envoy_config=config
    ) as fleet:
        yield fleet


def served(fleet: Fleet, response: Response) -> str:
    """Which engine answered ("?" for a reply Envoy made itself)."""
    return fleet.engine_of(response.headers.get("x-simulator-pod"))


def run_load(fleet: Fleet, strategy: str) -> list[Response]:
    return drive_all(
        lambda i: send_chat(
            fleet.gateway.port, FLEET_MODEL, strategy, f"request {i}", max_tokens=REPLY_TOKENS
        ),
        total=REQUESTS,
        concurrency=CONCURRENCY,
        budget=LOAD_BUDGET,
    )


def outcomes(fleet: Fleet, responses: list[Response]) -> Counter[tuple[int, str]]:
    return Counter((r.status, served(fleet, r)) for r in responses)


def wait_served_again(fleet: Fleet, strategy: str) -> None:
    """Until the recovered engine answers a request routed by `strategy` (its ejection
    ends within 4 s; the next request it gets is the probe)."""
    poll(
        f"engine {FAILING} serves again under {strategy}",
        lambda: [
            served(fleet, r)
            for r in (
                send_chat(fleet.gateway.port, FLEET_MODEL, strategy, f"after {i}", max_tokens=1)
                for i in range(CONCURRENCY)
            )
        ],
        lambda engines: FAILING in engines,
    )


@contextlib.contextmanager
def killed(fleet: Fleet) -> Iterator[None]:
    fleet.kill_engine(FAILING)
    try:
        yield
    finally:
        localstack.wait_ready([fleet.start_engine(FAILING)])
        wait_metrics_flowing(fleet)


@pytest.mark.parametrize("strategy", ["least-request", "prefix-cache"])
def test_a_killed_engine_gets_almost_no_traffic_and_its_share_back_once_restarted(
    fleet: Fleet, strategy: str
) -> None:
    with killed(fleet):
        responses = run_load(fleet, strategy)
        seen = outcomes(fleet, responses)
        print(f"{strategy}, engine {FAILING} killed: {dict(seen)}")
        failed = sum(n for (status, _), n in seen.items() if status != 200)
        # Every request that failed was one Envoy could not connect for (a 503 of its
        # own, after its one retry); every other was served by a live engine.
        assert set(seen) <= {(200, "a"), (200, "b"), (503, "?")}, seen
        # Passive health leaves the dead pod out after a few failures (or refused
        # metrics scrapes); what still reaches it are the probes after each ejection.
        assert failed <= 0.15 * len(responses), seen
    wait_served_again(fleet, strategy)


@pytest.mark.parametrize("strategy", ["least-request", "prefix-cache"])
def test_an_engine_answering_500_gets_almost_no_traffic_and_its_share_back_once_fixed(
    fleet: Fleet, strategy: str
) -> None:
    set_faults(fleet.engines[FAILING], fail_requests=1.0)
    try:
        responses = run_load(fleet, strategy)
    finally:
        reset_faults(fleet.engines[FAILING])
    seen = outcomes(fleet, responses)
    print(f"{strategy}, engine {FAILING} answering 500: {dict(seen)}")
    failed = seen[(500, FAILING)]
    # The engine's own 500s reach the client (not retryable); only a few were sent.
    assert set(seen) <= {(200, "a"), (200, "b"), (500, FAILING)}, seen
    assert failed <= 0.15 * len(responses), seen
    wait_served_again(fleet, strategy)


def test_a_hung_engine_is_timed_out_by_envoy_and_then_left_out(fleet: Fleet) -> None:
    # A thousand times slower: 20 s before the first token, i.e. nothing for a while.
    # `random` is blind to load: without passive health it keeps sending a third of
    # the requests there.
    set_faults(fleet.engines[FAILING], slow_factor=1000.0)
    try:
        responses = run_load(fleet, "random")
    finally:
        reset_faults(fleet.engines[FAILING])
    seen = outcomes(fleet, responses)
    print(f"random, engine {FAILING} hung: {dict(seen)}")
    # Envoy's per-try idle timeout ended each request the hung engine held (a 504 of
    # its own); passive health counted them and left the engine out.
    assert set(seen) <= {(200, "a"), (200, "b"), (504, "?")}, seen
    assert seen[(504, "?")] <= 0.15 * len(responses), seen
    wait_served_again(fleet, "random")
