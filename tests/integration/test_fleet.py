"""Many processors, one fleet: responses that outlive their processor, drains, replicas
behind one health-checked Envoy, fail-open, and `serve --workers N`.

Every test starts its own processors (on the session's simulated engines and models
file) and its own Envoy, because it kills or restarts them. Loads are bounded in count
and time; waits are bounded polls.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import ManagedProcess
from tests.integration.stack import (
    CHAT_MODEL,
    LOCALHOST,
    PROCESSOR_ARGS,
    UNREADY_MODEL,
    Pod,
    chat,
    http_request,
    model_addresses,
    poll,
)

EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# Short drains keep the suite quick; the Envoys health-check every second.
DRAIN_ARGS = ["--drain-delay", "2", "--grace-period", "20"]


# -- processes ------------------------------------------------------------------------


@dataclass
class Replica:
    """One processor (`serve`) on fixed ports, which a test may stop and start again."""

    models_path: Path
    log_dir: Path
    env: dict[str, str]
    name: str
    extra_args: list[str] = field(default_factory=list)
    grpc_port: int = field(default_factory=localstack.free_port)
    admin_port: int = field(default_factory=localstack.free_port)
    process: ManagedProcess | None = None
    starts: int = 0

    def start(self) -> Replica:
        self.starts += 1
        self.process = localstack.start_processor(
            self.models_path,
            self.log_dir,
            grpc_port=self.grpc_port,
            admin_port=self.admin_port,
            extra_args=[*PROCESSOR_ARGS, *DRAIN_ARGS, *self.extra_args],
            env=self.env,
            name=f"{self.name}-{self.starts}",
        )
        localstack.wait_ready([self.process], timeout=30.0)
        return self

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.popen.send_signal(sig)

    def wait_exit(self, timeout: float = 40.0) -> int:
        assert self.process is not None
        return self.process.popen.wait(timeout)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def log(self) -> str:
        assert self.process is not None
        return self.process.log_path.read_text(encoding="utf-8", errors="replace")

    def metrics(self) -> str:
        response = http_request(self.admin_port, "GET", "/metrics")
        assert response.status == 200
        return response.body.decode()


@dataclass
class Front:
    """An Envoy in front of the replicas."""

    process: ManagedProcess
    port: int
    admin_port: int

    def processor_streams(self, stat: str) -> dict[int, int]:
        """Envoy's per-processor stream count `stat` (rq_active, rq_total), by port."""
        text = http_request(self.admin_port, "GET", "/clusters").body.decode()
        counts = {}
        for line in text.splitlines():
            parts = line.split("::")
            if parts[0] == localstack.EXTPROC_CLUSTER and parts[2:3] == [stat]:
                counts[int(parts[1].rpartition(":")[2])] = int(parts[3])
        return counts

    def healthy_processors(self) -> set[int]:
        """Ports of the processor endpoints Envoy currently sends streams to."""
        text = http_request(self.admin_port, "GET", "/clusters").body.decode()
        healthy = set()
        for line in text.splitlines():
            parts = line.split("::")
            if parts[0] == localstack.EXTPROC_CLUSTER and parts[2:4] == ["health_flags", "healthy"]:
                healthy.add(int(parts[1].rpartition(":")[2]))
        return healthy


@pytest.fixture
def fleet(
    stack: tuple[dict[str, Pod], object, Path], log_dir: Path, child_env: dict[str, str]
) -> Iterator[list[Replica]]:
    """Replicas the test makes (`fleet.append(...)`), all stopped at the end."""
    replicas: list[Replica] = []
    yield replicas
    for replica in replicas:
        replica.stop()


def new_replica(
    fleet: list[Replica],
    stack: tuple[dict[str, Pod], object, Path],
    log_dir: Path,
    env: dict[str, str],
    *extra_args: str,
) -> Replica:
    replica = Replica(stack[2], log_dir, env, f"fleet-{len(fleet)}", list(extra_args))
    fleet.append(replica)
    return replica


@contextlib.contextmanager
def front(
    config: Path, replicas: list[Replica], log_dir: Path, name: str, concurrency: int = 1
) -> Iterator[Front]:
    port, admin_port = localstack.free_port(), localstack.free_port()
    process = localstack.start_envoy(
        config,
        log_dir,
        listen_port=port,
        admin_port=admin_port,
        extproc_port=[r.grpc_port for r in replicas],
        concurrency=concurrency,
        name=name,
    )
    try:
        localstack.wait_ready([process])
        envoy = Front(process, port, admin_port)
        ports = {r.grpc_port for r in replicas if r.process is not None and r.process.alive()}
        poll("Envoy sees the processors healthy", envoy.healthy_processors, lambda s: s >= ports)
        yield envoy
    finally:
        process.stop()


# -- a streaming client ---------------------------------------------------------------


def long_stream_request(max_tokens: int = 1500) -> bytes:
    """A streamed completion of seconds (2 ms per token) that reports its usage."""
    body = json.dumps(
        {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
        }
    ).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {LOCALHOST}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


@contextlib.contextmanager
def started_stream(
    port: int, request: bytes | None = None
) -> Iterator[tuple[socket.socket, bytearray]]:
    """A long stream through Envoy whose first event has arrived (chat's unless
    `request` is given)."""
    with socket.create_connection((LOCALHOST, port), timeout=30) as sock:
        sock.sendall(request if request is not None else long_stream_request())
        received = bytearray()
        while b"data: " not in received:
            data = sock.recv(65536)
            assert data, f"connection closed before the first event: {bytes(received)!r}"
            received += data
        assert received.startswith(b"HTTP/1.1 200")
        yield sock, received


def read_to_end(sock: socket.socket, received: bytearray) -> bytes:
    while True:
        data = sock.recv(65536)
        if not data:
            return bytes(received)
        received += data


def completion_tokens(stream: bytes) -> int:
    """The usage chunk's completion_tokens (the simulator sends one when asked)."""
    marker = b'"completion_tokens":'
    at = stream.rindex(marker) + len(marker)
    return int(stream[at : at + 12].split(b",")[0].split(b"}")[0])


# -- 1. a response never depends on the processor once routed --------------------------


@pytest.mark.parametrize(
    ("how", "grace", "config"),
    [
        (signal.SIGKILL, "20", localstack.ENVOY_CONFIG),
        (signal.SIGTERM, "20", localstack.ENVOY_CONFIG),
        (signal.SIGTERM, "0.5", localstack.ENVOY_CONFIG),
        # One filter: the response waits on the processor, so the drain carries it.
        (signal.SIGTERM, "20", localstack.ENVOY_FULL_DUPLEX_CONFIG),
    ],
    ids=["kill-9", "sigterm", "sigterm-grace-shorter-than-the-stream", "one-filter-sigterm"],
)
def test_a_started_stream_outlives_its_processor(
    how: signal.Signals, grace: str, config: Path, fleet, stack, log_dir, child_env
) -> None:
    replica = new_replica(
        fleet, stack, log_dir, child_env, "--drain-delay", "0.5", "--grace-period", grace
    ).start()
    name = f"envoy-outlive-{how.name}-{config.stem}-{grace}"
    with (
        front(config, [replica], log_dir, name) as envoy,
        started_stream(envoy.port) as (sock, received),
    ):
        replica.signal(how)
        stream = read_to_end(sock, received)
    assert stream.rstrip().endswith(b"0"), "the chunked response did not end cleanly"
    assert b"data: [DONE]" in stream[-200:], stream[-300:]
    if how is signal.SIGTERM:
        assert replica.wait_exit() == 0
    if how is signal.SIGTERM and grace == "20":
        # Drained, not cut: the processor saw the response end and counted its tokens.
        tokens = completion_tokens(stream)
        assert tokens > 0
        finished = [
            line
            for line in replica.log().splitlines()
            if "request_finished" in line and f"completion_tokens={tokens}" in line
        ]
        assert finished, replica.log()[-3000:]


# -- 2. graceful shutdown ----------------------------------------------------------------


def grpc_health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"{LOCALHOST}:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(reply.status)


def test_sigterm_says_not_serving_at_once_and_answers_new_streams_during_the_drain(
    fleet, stack, log_dir, child_env
) -> None:
    replica = new_replica(fleet, stack, log_dir, child_env, "--drain-delay", "30").start()

    with front(localstack.ENVOY_CONFIG, [replica], log_dir, "envoy-drain") as envoy:
        assert chat(envoy.port, CHAT_MODEL).status == 200
        replica.signal(signal.SIGTERM)
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", EXTPROC_SERVICE):
            poll(
                f"gRPC health of {service!r} is NOT_SERVING",
                lambda s=service: grpc_health(replica.grpc_port, s),
                lambda status: status == not_serving,
            )
        readyz = http_request(replica.admin_port, "GET", "/readyz")
        assert readyz.status == 503 and b"draining" in readyz.body
        # Still answering within the drain delay (Envoy has no other processor here).
        response = chat(envoy.port, CHAT_MODEL)
        assert response.status == 200, response.body
        # A second signal ends the drain delay; it then exits cleanly.
        replica.signal(signal.SIGTERM)
        assert replica.wait_exit() == 0


# -- two replicas behind one health-checked Envoy ---------------------------------------


@dataclass
class SteadyLoad:
    """`clients` threads sending short completions one after another until stopped;
    each result is (start time, status)."""

    port: int
    clients: int = 3
    limit_s: float = 120.0
    results: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> SteadyLoad:
        deadline = time.monotonic() + self.limit_s
        for _ in range(self.clients):
            thread = threading.Thread(target=self._run, args=(deadline,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                status = chat(self.port, CHAT_MODEL, max_tokens=5).status
            except OSError:
                status = 0
            self.results.append((started, status))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def sent(self) -> int:
        return len(self.results)

    def failures(self, after: float = 0.0) -> list[tuple[float, int]]:
        return [(t, s) for t, s in self.results if t >= after and s != 200]


def wait_for_more(load: SteadyLoad, count: int) -> None:
    target = load.sent() + count
    poll(f"{count} more requests", load.sent, lambda sent: sent >= target)


def test_a_rolling_restart_under_steady_load_loses_no_request(
    fleet, stack, log_dir, child_env
) -> None:
    replicas = [new_replica(fleet, stack, log_dir, child_env).start() for _ in range(2)]
    with front(localstack.ENVOY_CONFIG, replicas, log_dir, "envoy-rolling") as envoy:
        with SteadyLoad(envoy.port) as load:
            wait_for_more(load, 20)
            for replica in replicas:
                replica.signal(signal.SIGTERM)
                assert replica.wait_exit() == 0
                wait_for_more(load, 10)  # served by the other one meanwhile
                replica.start()
                poll(
                    "Envoy sends to the restarted replica",
                    envoy.healthy_processors,
                    lambda seen, port=replica.grpc_port: port in seen,
                )
                wait_for_more(load, 20)
        assert load.sent() >= 80
        assert load.failures() == [], f"{len(load.failures())} of {load.sent()} failed"


def test_a_killed_replica_fails_nothing_that_starts_two_seconds_later(
    fleet, stack, log_dir, child_env
) -> None:
    replicas = [new_replica(fleet, stack, log_dir, child_env).start() for _ in range(2)]
    with front(localstack.ENVOY_CONFIG, replicas, log_dir, "envoy-kill") as envoy:
        with SteadyLoad(envoy.port) as load:
            wait_for_more(load, 20)
            replicas[0].signal(signal.SIGKILL)
            killed_at = time.monotonic()
            poll("3 s pass", time.monotonic, lambda now: now > killed_at + 3.0)
            wait_for_more(load, 40)
        late = [(t, s) for t, s in load.results if t >= killed_at + 2.0]
        assert len(late) >= 40
        assert load.failures(after=killed_at + 2.0) == []


# -- 5. fail-open ------------------------------------------------------------------------


def fail_open_config(pods: dict[str, Pod], log_dir: Path) -> Path:
    """envoy-fail-open.yaml with the fallback cluster on chat-model's pods."""
    doc = yaml.safe_load(localstack.ENVOY_FAIL_OPEN_CONFIG.read_text())
    cluster = next(
        c for c in doc["static_resources"]["clusters"] if c["name"] == "inference_pods_fallback"
    )
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}
        for host, _, port in (a.rpartition(":") for a in sorted(model_addresses(pods, CHAT_MODEL)))
    ]
    path = log_dir / "envoy-fail-open-pods.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_fail_open_keeps_answering_with_every_processor_killed_and_routes_again_after(
    fleet, stack, log_dir, child_env
) -> None:
    pods = stack[0]
    replicas = [new_replica(fleet, stack, log_dir, child_env).start() for _ in range(2)]
    config = fail_open_config(pods, log_dir)
    with front(config, replicas, log_dir, "envoy-fail-open") as envoy:
        routed = chat(envoy.port, CHAT_MODEL)
        assert routed.status == 200
        unknown = chat(envoy.port, "no-such-model")
        assert unknown.status == 404 and unknown.error_code() == "model_not_found"
        for replica in replicas:
            replica.signal(signal.SIGKILL)
            replica.wait_exit()
        statuses = [chat(envoy.port, CHAT_MODEL).status for _ in range(20)]
        assert statuses == [200] * 20
        # Envoy's own balancing: both of the model's pods get requests.
        served = {chat(envoy.port, CHAT_MODEL).headers["x-simulator-pod"] for _ in range(20)}
        assert served == model_addresses(pods, CHAT_MODEL)
        # The processor returns and takes over: unknown models are its 404 again.
        replicas[0].start()
        poll(
            "the processor answers again",
            lambda: chat(envoy.port, "no-such-model").error_code(),
            lambda code: code == "model_not_found",
        )


# -- 3. serve --workers N ----------------------------------------------------------------


def requests_total(metrics: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "gateway_requests_total":
                total += sample.value
    return total


def sample_value(metrics: str, name: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_workers_serve_the_same_traffic_as_one_process(
    workers: str, fleet, stack, log_dir, child_env
) -> None:
    pods = stack[0]
    replica = new_replica(fleet, stack, log_dir, child_env, "--workers", workers).start()
    # Two Envoy threads: two connections to the processor, for the kernel to spread.
    with front(localstack.ENVOY_CONFIG, [replica], log_dir, f"envoy-w{workers}", 2) as envoy:
        before = requests_total(replica.metrics())
        sent = 0
        for _ in range(10):
            ok = chat(envoy.port, CHAT_MODEL, stream=True, stream_options={"include_usage": True})
            assert ok.status == 200 and b"data: [DONE]" in ok.body
            assert ok.headers["x-simulator-pod"] in model_addresses(pods, CHAT_MODEL)
            missing = chat(envoy.port, "no-such-model")
            assert missing.status == 404 and missing.error_code() == "model_not_found"
            unready = chat(envoy.port, UNREADY_MODEL)
            assert unready.status == 503 and unready.error_code() == "no_ready_pods"
            sent += 3
        seen = poll(
            "every request is counted",
            lambda: requests_total(replica.metrics()) - before,
            lambda counted: counted >= sent,
        )
        assert seen == sent
        metrics = replica.metrics()
        assert sample_value(metrics, "gateway_in_flight_requests") == 0
        assert 'gateway_tokens_total{kind="completion"' in metrics


def workers_of(pid: int) -> list[int]:
    """The worker processes of a `serve --workers N` (not multiprocessing's helpers)."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


def test_a_dead_worker_is_restarted_and_strangers_cannot_share_the_port(
    fleet, stack, log_dir, child_env
) -> None:
    replica = new_replica(fleet, stack, log_dir, child_env, "--workers", "2").start()
    assert replica.process is not None

    # A second, unrelated processor on the same gRPC port is refused.
    stranger = subprocess.run(
        localstack.gateway_command(
            "serve",
            "--listen-host",
            LOCALHOST,
            "--grpc-port",
            str(replica.grpc_port),
            "--admin-port",
            str(localstack.free_port()),
            "--models-file",
            str(stack[2]),
        ),
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env,
        check=False,
    )
    assert stranger.returncode != 0
    assert "cannot listen" in stranger.stderr and "Traceback" not in stranger.stderr

    workers = poll("two workers", lambda: workers_of(replica.process.pid), lambda w: len(w) >= 2)
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    poll(
        "the dead worker is restarted",
        lambda: sample_value(replica.metrics(), "gateway_worker_restarts_total"),
        lambda restarts: restarts == 1,
    )
    poll(
        "ready again with every worker",
        lambda: http_request(replica.admin_port, "GET", "/readyz").status,
        lambda status: status == 200,
    )
    assert victim not in workers_of(replica.process.pid)
    assert "worker_died" in replica.log()


def test_two_replicas_count_every_request_once_wherever_its_response_is_observed(
    fleet, stack, log_dir, child_env
) -> None:
    # Envoy balances each ext_proc stream on its own, so a request's observer stream
    # often reaches the replica that did not route it; it is counted there, once.
    replicas = [new_replica(fleet, stack, log_dir, child_env).start() for _ in range(2)]
    with front(localstack.ENVOY_CONFIG, replicas, log_dir, "envoy-two-counts") as envoy:
        before = sum(requests_total(r.metrics()) for r in replicas)
        tokens_before = sum(completion_tokens_counted(r.metrics()) for r in replicas)
        sent_tokens = 0
        for _ in range(20):
            response = chat(
                envoy.port, CHAT_MODEL, stream=True, stream_options={"include_usage": True}
            )
            assert response.status == 200
            sent_tokens += completion_tokens(response.body)
        counted = poll(
            "every request is counted",
            lambda: sum(requests_total(r.metrics()) for r in replicas) - before,
            lambda seen: seen >= 20,
        )
        assert counted == 20
        tokens = sum(completion_tokens_counted(r.metrics()) for r in replicas) - tokens_before
        assert tokens == sent_tokens


def completion_tokens_counted(metrics: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "gateway_tokens_total" and sample.labels["kind"] == "completion":
                total += sample.value
    return total


# -- the Responses API and Anthropic Messages: streams with their own end marks -----------

# A long stream of each (2 ms per token), its path, and the events that may end it.
API_STREAMS = {
    "responses": (
        "/v1/responses",
        {"input": "Tell me a long story.", "max_output_tokens": 1500},
        {"response.completed", "response.incomplete"},
    ),
    "messages": (
        "/v1/messages",
        {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1500},
        {"message_stop"},
    ),
}


def api_stream_request(api: str) -> bytes:
    path, fields, _ = API_STREAMS[api]
    body = json.dumps({"model": CHAT_MODEL, "stream": True, **fields}).encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: {LOCALHOST}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


def sse_events(response: bytes) -> list[dict]:
    """The events of a chunked HTTP/1.1 SSE response, parsed (the client's view)."""
    head, _, rest = response.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = bytearray()
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    events = []
    for block in bytes(body).split(b"\n\n"):
        data = [line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")]
        if data:
            events.append(json.loads(b"\n".join(data)))
    return events


def usage_of_stream(events: list[dict]) -> tuple[int, int]:
    """(input, output) tokens the engine reported in a Responses or Messages stream."""
    last = events[-1]
    if last["type"].startswith("response."):
        usage = last["response"]["usage"]
        return usage["input_tokens"], usage["output_tokens"]
    start = next(e for e in events if e["type"] == "message_start")
    delta = [e for e in events if e["type"] == "message_delta"][-1]
    return start["message"]["usage"]["input_tokens"], delta["usage"]["output_tokens"]


def tokens_counted(replica: Replica) -> tuple[float, float]:
    """(prompt, completion) tokens `replica` counted, over every model and pod."""
    counted = {"prompt": 0.0, "completion": 0.0}
    for family in text_string_to_metric_families(replica.metrics()):
        for sample in family.samples:
            if sample.name == "gateway_tokens_total":
                counted[sample.labels["kind"]] += sample.value
    return counted["prompt"], counted["completion"]


@pytest.mark.parametrize("api", API_STREAMS)
def test_a_started_api_stream_outlives_the_processor_that_routed_it_and_is_counted(
    api: str, fleet, stack, log_dir, child_env
) -> None:
    # Two replicas: Envoy balances the routing and the observer stream of a request on
    # their own, so the response is observed by the replica that did not route it, which
    # knows the request only from the routing answer's context.
    replicas = [new_replica(fleet, stack, log_dir, child_env).start() for _ in range(2)]
    with front(localstack.ENVOY_CONFIG, replicas, log_dir, f"envoy-endmark-{api}") as envoy:
        before = {r.grpc_port: tokens_counted(r) for r in replicas}
        streams_before = envoy.processor_streams("rq_total")
        with started_stream(envoy.port, api_stream_request(api)) as (sock, received):
            # The observer stream is the one Envoy still holds open; the routing stream
            # ended once the request was routed.
            active = poll(
                "one processor stream open (the observer's)",
                lambda: envoy.processor_streams("rq_active"),
                lambda counts: sorted(counts.values()) == [0, 1],
            )
            opened = envoy.processor_streams("rq_total")
            assert all(opened[p] - streams_before[p] == 1 for p in opened), "same processor"
            observer = next(r for r in replicas if active[r.grpc_port] == 1)
            router = next(r for r in replicas if r is not observer)
            router.signal(signal.SIGKILL)
            stream = read_to_end(sock, received)
        events = sse_events(stream)
        assert events[-1]["type"] in API_STREAMS[api][2], events[-1]
        prompt, completion = usage_of_stream(events)
        assert prompt > 0 and completion > 0
        start = before[observer.grpc_port]
        counted = poll(
            "the observer counted the stream's tokens",
            lambda: tokens_counted(observer),
            lambda now: now[1] > start[1],
        )
        assert (counted[0] - start[0], counted[1] - start[1]) == (prompt, completion)
        # Log lines are written in batches, a moment after the request ends.
        poll("the observer's access log line", observer.log, lambda log: "request_finished" in log)
