"""Building blocks for the routing-strategy end-to-end tests (test_strategies_e2e.py).

Those tests need a processor tuned differently from the shared one in conftest.py: engine
metrics scraped every 0.1 s and stale after 1 s (so a broken metrics endpoint shows within
a test), a short slow-start window, and models of their own. This module starts such a
fleet (simulated engines, the processor, a real Envoy on envoy/envoy.yaml), switches
faults on the engines, drives concurrent load through Envoy while counting which pod
answered, holds long streams open to keep pods busy, and reads the processor's
Prometheus counters. It reuses stack.py's client, polling and process handles.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import ManagedProcess, ProcessGroup
from tests.integration.stack import (
    DEADLINE,
    LOCALHOST,
    Gateway,
    ModelsFile,
    Pod,
    Processor,
    Response,
    add_processor,
    http_request,
    post_json,
    running_gateway,
)

POD_HEADER = "x-simulator-pod"

# Three engines; every model lists its own pod entries (`<model>-<engine>`), so in-flight
# counts and prefix-index entries of one test's model never steer another test's picks.
ENGINES = ("a", "b", "c")
FLEET_MODEL = "fleet-model"  # a, b, c: load balancing, broken metrics, strategy names
PREFIX_MODEL = "prefix-model"  # a, b, c: prefix-cache stickiness and spill
RAMP_MODEL = "ramp-model"  # a, b at start; the slow-start test adds c while it runs
LATENCY_MODEL = "latency-model"  # a, b, c: the default's measured latencies
MODEL_ENGINES: Mapping[str, tuple[str, ...]] = {
    FLEET_MODEL: ENGINES,
    PREFIX_MODEL: ENGINES,
    RAMP_MODEL: ("a", "b"),
    LATENCY_MODEL: ENGINES,
}

# Engine time (20 ms to the first token, 5 ms per token after it) large enough to dominate
# the gateway's own overhead on a 2-core machine, so "slow" and "fast" differ at the client
# as they do in the engine. The KV cache is large enough that held streams never queue.
SIMULATOR_ARGS = ["--ttft-ms", "20", "--itl-ms", "5", "--kv-blocks", "16384"]
METRICS_INTERVAL = 0.1
METRICS_TIMEOUT = 0.5
METRICS_STALENESS = 1.0
SLOW_START_WINDOW = 6.0
PROCESSOR_ARGS = [
    "--metrics-interval",
    str(METRICS_INTERVAL),
    "--metrics-timeout",
    str(METRICS_TIMEOUT),
    "--metrics-staleness",
    str(METRICS_STALENESS),
    "--slow-start-window",
    str(SLOW_START_WINDOW),
    "--models-reload-interval",
    "0.1",
    "--log-level",
    "info",
]


def pod_name(model: str, engine: str) -> str:
    """The pod's name (and routing key) in the models file."""
    return f"{model}-{engine}"


def fleet_dictionary(engines: Mapping[str, Pod]) -> dict[str, Any]:
    """The models file the fleet's processor starts with."""
    return {
        "models": [
            {
                "name": model,
                "pods": [
                    {"name": pod_name(model, e), "address": engines[e].address} for e in served
                ],
            }
            for model, served in MODEL_ENGINES.items()
        ]
    }


# -- the fleet ------------------------------------------------------------------------


@dataclass
class Fleet:
    """Simulated engines behind a processor of their own and a real Envoy."""

    engines: dict[str, Pod]  # engine letter -> its address
    processor: Processor
    gateway: Gateway
    models: ModelsFile
    group: ProcessGroup  # every process, the engines' included (restarted ones too)
    log_dir: Path
    env: Mapping[str, str]
    name: str = "strategies"

    @property
    def process(self) -> ManagedProcess:
        # conftest's failure hook attaches the log of any test argument with a `process`.
        return self.processor.process

    def engine_of(self, address: str | None) -> str:
        """Engine letter for an `x-simulator-pod` value ("?" when none answered)."""
        for name, pod in self.engines.items():
            if pod.address == address:
                return name
        return "?"

    def pod_keys(self) -> int:
        return sum(len(served) for served in MODEL_ENGINES.values())

    def start_engine(self, engine: str) -> ManagedProcess:
        """Start engine `engine` on its address again (after `kill_engine`)."""
        return start_engine(self.group, self.engines[engine], self.log_dir, self.env, self.name)

    def kill_engine(self, engine: str) -> None:
        """SIGKILL engine `engine`: a crashed engine, no goodbye to anyone."""
        for process in self.group:
            if process.name == f"simulator-{self.name}-{engine}" and process.alive():
                process.popen.kill()
                process.stop()


def start_engine(
    group: ProcessGroup, engine: Pod, log_dir: Path, env: Mapping[str, str], fleet: str
) -> ManagedProcess:
    """A simulated engine serving every fleet model at `engine`'s address, in `group`."""
    return group.add(
        localstack.start_simulator(
            engine.port,
            list(MODEL_ENGINES),
            log_dir,
            extra_args=SIMULATOR_ARGS,
            env=env,
            name=f"simulator-{fleet}-{engine.name}",
        )
    )


@contextlib.contextmanager
def running_fleet(
    log_dir: Path,
    env: Mapping[str, str],
    *,
    name: str = "strategies",
    processor_args: Sequence[str] = (),
    envoy_config: Path = localstack.ENVOY_CONFIG,
) -> Iterator[Fleet]:
    """Start the engines and the processor in parallel, then Envoy; stop all at the end.
    `processor_args` come after the fleet's own; `name` keeps logs and files apart."""
    engines = {e: Pod(e, f"{LOCALHOST}:{localstack.free_port()}") for e in ENGINES}
    models_path = log_dir / f"{name}-models.yaml"
    models_path.write_text(yaml.safe_dump(fleet_dictionary(engines), sort_keys=False))
    with ProcessGroup() as group:
        processor = add_processor(
            group,
            models_path,
            log_dir,
            extra_args=[*PROCESSOR_ARGS, *processor_args],
            env=env,
            name=f"processor-{name}",
        )
        for engine in engines.values():
            start_engine(group, engine, log_dir, env, name)
        localstack.wait_ready(group, timeout=30.0)
        with running_gateway(envoy_config, processor.grpc_port, log_dir, f"envoy-{name}") as gw:
            yield Fleet(engines, processor, gw, ModelsFile(models_path), group, log_dir, env, name)


# -- faults on the engines ------------------------------------------------------------


def set_faults(pod: Pod, **settings: Any) -> None:
    """Switch faults on one engine (its /admin/faults, not through the gateway)."""
    response = post_json(pod.port, "/admin/faults", settings)
    assert response.status == 200, response.body


def reset_faults(pod: Pod) -> None:
    response = http_request(pod.port, "POST", "/admin/faults/reset", b"")
    assert response.status == 200, response.body


# -- requests -------------------------------------------------------------------------


def chat_doc(model: str, content: str = "Say hello.", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def send_chat(
    port: int, model: str, strategy: str, content: str = "Say hello.", **extra: Any
) -> Response:
    """One chat completion through Envoy with the `routing-strategy` header."""
    headers = {"routing-strategy": strategy} if strategy else {}
    return post_json(port, "/v1/chat/completions", chat_doc(model, content, **extra), headers)


def served_by(response: Response) -> str | None:
    return response.headers.get(POD_HEADER)


@dataclass(frozen=True)
class Sample:
    started: float  # seconds since the run began
    response: Response


def drive(
    send: Callable[[int], Response], *, total: int, concurrency: int, budget: float
) -> list[Sample]:
    """Closed-loop load: `concurrency` clients, each sending its next request as soon as
    its last one is answered, until `total` were sent or `budget` seconds have passed.

    Returns what came back, in completion order; a client's exception is re-raised here.
    """
    counter = itertools.count()
    lock = threading.Lock()
    samples: list[Sample] = []
    began = time.monotonic()
    deadline = began + budget

    def client() -> None:
        while True:
            with lock:
                i = next(counter)
            if i >= total or time.monotonic() >= deadline:
                return
            started = time.monotonic() - began
            response = send(i)
            with lock:
                samples.append(Sample(started, response))

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    return samples


def drive_all(
    send: Callable[[int], Response], *, total: int, concurrency: int, budget: float
) -> list[Response]:
    """`drive` that must finish all `total` requests within `budget` seconds."""
    samples = drive(send, total=total, concurrency=concurrency, budget=budget)
    if len(samples) < total:
        pytest.fail(f"only {len(samples)} of {total} requests were answered in {budget}s")
    return [s.response for s in samples]


def shares(fleet: Fleet, responses: Sequence[Response]) -> dict[str, float]:
    """Fraction of `responses` each engine served, by engine letter (all letters present)."""
    counts = Counter(fleet.engine_of(served_by(r)) for r in responses)
    return {e: round(counts[e] / max(len(responses), 1), 3) for e in fleet.engines}


# -- held streams ---------------------------------------------------------------------


class HeldStream:
    """A streamed completion kept open after its first token: its pod stays busy (in
    flight for the processor, running for the engine) until `close()` hangs up."""

    def __init__(self, port: int, doc: dict[str, Any], headers: Mapping[str, str]) -> None:
        body = json.dumps({**doc, "stream": True}).encode()
        lines = [
            "POST /v1/chat/completions HTTP/1.1",
            f"host: {LOCALHOST}:{port}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        self._sock = socket.create_connection((LOCALHOST, port), timeout=DEADLINE)
        try:
            self._sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            head, received = self._read_until_first_event()
        except BaseException:
            self._sock.close()
            raise
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        fields = dict(line.split(":", 1) for line in header_lines if ":" in line)
        self.pod = {k.strip().lower(): v.strip() for k, v in fields.items()}.get(POD_HEADER)
        if self.status != 200 or self.pod is None:
            self._sock.close()
            raise AssertionError(f"held stream was not served: {head + received!r}")

    def _read_until_first_event(self) -> tuple[bytes, bytes]:
        received = b""
        # Bounded by the socket timeout per read and by the size of what may arrive.
        while len(received) < 1 << 20:
            head, sep, rest = received.partition(b"\r\n\r\n")
            if sep and (b"data: " in rest or not head.startswith(b"HTTP/1.1 200")):
                return head, rest
            data = self._sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed before the first event: {received!r}")
            received += data
        raise AssertionError("no event in the first MiB of the response")

    def close(self) -> None:
        self._sock.close()


def hold_streams(
    port: int, count: int, doc: dict[str, Any], headers: Mapping[str, str]
) -> list[HeldStream]:
    """Open `count` held streams at once (a burst), each running when this returns."""
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(HeldStream, port, doc, headers) for _ in range(count)]
        held: list[HeldStream] = []
        errors: list[BaseException] = []
        for future in futures:
            try:
                held.append(future.result())
            except Exception as exc:
                errors.append(exc)
    if errors:
        for stream in held:
            stream.close()
        raise errors[0]
    return held


# -- the processor's view -------------------------------------------------------------


def samples_of(processor: Processor, metric: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample of `metric` on the processor's /metrics, by label set."""
    found = {}
    for family in text_string_to_metric_families(processor.metrics()):
        for sample in family.samples:
            if sample.name == metric:
                found[frozenset(sample.labels.items())] = sample.value
    return found


def fallbacks_by_strategy(processor: Processor) -> Counter[str]:
    """gateway_routing_fallback_total summed over reasons, by strategy."""
    totals: Counter[str] = Counter()
    for labels, value in samples_of(processor, "gateway_routing_fallback_total").items():
        totals[dict(labels)["strategy"]] += int(value)
    return totals


def in_flight(processor: Processor, model: str) -> int:
    view = processor.get("/debug/models").json()["models"].get(model, {"pods": []})
    return sum(int(pod["in_flight"]) for pod in view["pods"])


def _scrape_counts(processor: Processor) -> tuple[float, float]:
    """(successful scrapes, failed scrapes) so far, over every pod."""
    ok = sum(samples_of(processor, "gateway_metrics_scrape_duration_seconds_count").values())
    failed = sum(samples_of(processor, "gateway_metrics_scrape_failures_total").values())
    return ok, failed


def wait_metrics_flowing(fleet: Fleet) -> None:
    """Until every pod's engine metrics are scraped successfully again: a quiet stretch
    longer than a scrape timeout (so a hung scrape still pending would have failed in
    it) with no failure and at least two successes per pod."""
    quiet_for = METRICS_TIMEOUT + 2 * METRICS_INTERVAL
    wanted = 2 * fleet.pod_keys()
    deadline = time.monotonic() + DEADLINE
    ok, failed = _scrape_counts(fleet.processor)
    quiet_since, ok_at_start = time.monotonic(), ok
    while True:
        time.sleep(METRICS_INTERVAL)
        ok, now_failed = _scrape_counts(fleet.processor)
        now = time.monotonic()
        if now_failed != failed:
            failed, quiet_since, ok_at_start = now_failed, now, ok
        elif now - quiet_since >= quiet_for and ok - ok_at_start >= wanted:
            return
        if now > deadline:
            pytest.fail(f"engine metrics still failing after {DEADLINE}s ({failed} failures)")


def wait_scraped(fleet: Fleet, rounds: int = 2) -> None:
    """Until the processor has scraped every pod `rounds` more times (about)."""
    start, _ = _scrape_counts(fleet.processor)
    wanted = start + rounds * fleet.pod_keys()
    deadline = time.monotonic() + DEADLINE
    while _scrape_counts(fleet.processor)[0] < wanted:
        if time.monotonic() > deadline:
            pytest.fail(f"the processor did not scrape {rounds} rounds in {DEADLINE}s")
        time.sleep(METRICS_INTERVAL)


def log_count(process: ManagedProcess, event: str) -> int:
    """Lines of the process's log that carry `event`."""
    try:
        text = process.log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if event in line)
