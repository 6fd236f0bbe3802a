"""Precise prefix routing end to end: simulated engines that tokenize with a real
tokenizer and publish vLLM's KV-cache events over ZMQ, the processor subscribed to them,
and a real Envoy in front.

The engines' caches are filled by requests sent straight to the engines, never through
the gateway, so only the events can tell the processor where a prefix lives. Requests
through Envoy then go to the engine holding their prefix, and stop going there once the
engine reports the blocks gone. A fourth pod's event socket is driven by the test with
garbage, a lost batch and a restart: the processor counts it, distrusts that pod, and
goes on routing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml
import zmq

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import ProcessGroup
from gateway_extproc.kvevents.wire import AllBlocksCleared, BlockStored, encode_batch, message
from tests.integration.stack import (
    LOCALHOST,
    Gateway,
    Pod,
    Processor,
    Response,
    add_processor,
    http_request,
    poll,
    post_json,
    running_gateway,
)
from tests.integration.strategy_stack import samples_of

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"
MODEL = "kv-model"
ENGINES = ("a", "b", "c")
STRATEGY = {"routing-strategy": "precise-prefix-cache"}
SYSTEM = (
    "You answer questions about the policy document below, citing its lines.\n"
    + "customer support policy: the quick brown fox jumps over the lazy dog\n" * 60
)
OTHER_SYSTEM = "You translate into french.\n" + "translate the following text please\n" * 60


@dataclass
class Engine:
    pod: Pod
    events_port: int
    replay_port: int


@dataclass
class Stack:
    engines: dict[str, Engine]
    noisy: Pod  # served by a plain engine; its event socket is the test's
    processor: Processor
    gateway: Gateway
    noisy_events: zmq.Socket

    @property
    def process(self) -> localstack.ManagedProcess:
        return self.processor.process  # conftest attaches its log to a failure

    def kv_view(self) -> dict[str, Any]:
        response = self.processor.get("/debug/kv-events")
        assert response.status == 200
        return json.loads(response.body)["pods"]

    def engine_named(self, address: str | None) -> str:
        for name, engine in self.engines.items():
            if engine.pod.address == address:
                return name
        return "noisy" if address == self.noisy.address else "?"


def chat(system: str, question: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    }


def distinct_free_ports(count: int) -> list[int]:
    """`count` free ports, no two alike (the OS may hand a just-closed one out again)."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(localstack.free_port())
    return sorted(ports)


@pytest.fixture(scope="module")
def kv_stack(log_dir: Path, child_env: dict[str, str]) -> Iterator[Stack]:
    ports = distinct_free_ports(3 * len(ENGINES) + 2)
    engines = {
        name: Engine(Pod(name, f"{LOCALHOST}:{ports.pop()}"), ports.pop(), ports.pop())
        for name in ENGINES
    }
    noisy = Pod("noisy", f"{LOCALHOST}:{ports.pop()}")
    noisy_port = ports.pop()
    pods = [
        {
            "name": f"kv-{name}",
            "address": engine.pod.address,
            "kv_events": f"tcp://{LOCALHOST}:{engine.events_port}",
            "kv_events_replay": f"tcp://{LOCALHOST}:{engine.replay_port}",
        }
        for name, engine in engines.items()
    ]
    pods.append(
        {
            "name": "kv-noisy",
            "address": noisy.address,
            "kv_events": f"tcp://{LOCALHOST}:{noisy_port}",
        }
    )
    models_path = log_dir / "precise-models.yaml"
    models_path.write_text(
        yaml.safe_dump(
            {"models": [{"name": MODEL, "tokenizer": str(TOKENIZER), "pods": pods}]},
            sort_keys=False,
        )
    )
    context = zmq.Context()
    noisy_events = context.socket(zmq.XPUB)  # XPUB: the test sees the subscription arrive
    noisy_events.setsockopt(zmq.LINGER, 0)
    noisy_events.bind(f"tcp://{LOCALHOST}:{noisy_port}")
    common = ["--ttft-ms", "5", "--itl-ms", "1", "--tokenizer", str(TOKENIZER)]
    try:
        with ProcessGroup() as group:
            for name, engine in engines.items():
                group.add(
                    localstack.start_simulator(
                        engine.pod.port,
                        [MODEL],
                        log_dir,
                        extra_args=[
                            *common,
                            "--kv-events-port",
                            str(engine.events_port),
                            "--kv-events-replay-port",
                            str(engine.replay_port),
                        ],
                        env=child_env,
                        name=f"simulator-kv-{name}",
                    )
                )
            group.add(
                localstack.start_simulator(
                    noisy.port,
                    [MODEL],
                    log_dir,
                    extra_args=common,
                    env=child_env,
                    name="simulator-kv-noisy",
                )
            )
            processor = add_processor(
                group,
                models_path,
                log_dir,
                extra_args=[
                    "--metrics-interval",
                    "0.1",
                    "--slow-start-window",
                    "0",
                    "--kv-events-dead-after",
                    "2",
                    "--log-level",
                    "info",
                ],
                env=child_env,
                name="processor-precise",
            )
            localstack.wait_ready(group, timeout=30.0)
            with running_gateway(
                localstack.ENVOY_CONFIG, processor.grpc_port, log_dir, "envoy-precise"
            ) as gateway:
                yield Stack(engines, noisy, processor, gateway, noisy_events)
    finally:
        context.destroy(linger=0)


def through_gateway(stack: Stack, doc: dict[str, Any]) -> str:
    response = post_json(stack.gateway.port, "/v1/chat/completions", doc, STRATEGY)
    assert response.status == 200, response.body
    return stack.engine_named(response.headers.get("x-simulator-pod"))


def straight_to(engine: Engine, path: str, doc: Any = None) -> Response:
    if doc is None:
        return http_request(engine.pod.port, "POST", path, b"")
    return post_json(engine.pod.port, path, doc)


def blocks_of(stack: Stack, name: str) -> int:
    return int(stack.kv_view()[f"kv-{name}"]["blocks"])


@pytest.fixture(scope="module")
def connected(kv_stack: Stack) -> Stack:
    stack = kv_stack
    poll(
        "every engine's event stream connected and trusted",
        stack.kv_view,
        lambda view: all(view[f"kv-{name}"]["trusted"] for name in ENGINES),
    )
    return stack


def test_requests_follow_the_engine_that_reports_their_prefix_until_it_drops_it(
    connected: Stack,
) -> None:
    stack = connected
    b, c = stack.engines["b"], stack.engines["c"]
    # Fill b's cache behind the gateway's back.
    assert straight_to(b, "/v1/chat/completions", chat(SYSTEM, "What is the policy?")).status == 200
    poll("b's blocks indexed", lambda: blocks_of(stack, "b"), lambda n: n > 10)
    picks = [through_gateway(stack, chat(SYSTEM, f"Question number {i}?")) for i in range(8)]
    assert picks == ["b"] * 8

    # b drops everything (vLLM's /reset_prefix_cache: AllBlocksCleared), and c now holds
    # the prefix, again without the gateway's knowledge.
    assert straight_to(b, "/reset_prefix_cache").status == 200
    poll("b's blocks dropped", lambda: blocks_of(stack, "b"), lambda n: n == 0)
    assert straight_to(c, "/v1/chat/completions", chat(SYSTEM, "Another?")).status == 200
    poll("c's blocks indexed", lambda: blocks_of(stack, "c"), lambda n: n > 10)
    picks = [through_gateway(stack, chat(SYSTEM, f"Later question {i}?")) for i in range(8)]
    assert picks == ["c"] * 8


def test_a_different_prefix_goes_where_that_prefix_is(connected: Stack) -> None:
    stack = connected
    a = stack.engines["a"]
    assert straight_to(a, "/v1/chat/completions", chat(OTHER_SYSTEM, "hello")).status == 200
    poll("a's blocks indexed", lambda: blocks_of(stack, "a"), lambda n: n > 10)
    assert {through_gateway(stack, chat(OTHER_SYSTEM, f"text {i}")) for i in range(5)} == {"a"}


def metric_value(processor: Processor, metric: str, **labels: str) -> float:
    return samples_of(processor, metric).get(frozenset(labels.items()), 0.0)


def send(socket: zmq.Socket, seq: int, payload: bytes) -> None:
    socket.send_multipart(message(b"kv", seq, payload))


def test_garbage_lost_and_restarted_streams_never_stop_the_processor(kv_stack: Stack) -> None:
    stack = kv_stack
    events = stack.noisy_events
    assert events.poll(10_000), "the processor never subscribed to the noisy pod's events"
    assert events.recv()[:1] == b"\x01"
    poll("the noisy pod trusted", stack.kv_view, lambda view: view["kv-noisy"]["trusted"])
    malformed = metric_value(stack.processor, "gateway_kv_events_malformed_total", what="message")
    gaps = metric_value(stack.processor, "gateway_kv_event_gaps_total")
    ids = tuple(range(64))
    events.send_multipart([b"one frame"])
    events.send_multipart([b"kv", b"\x01", b"short sequence"])
    send(events, 0, b"\xc1 not msgpack")
    send(events, 1, msgpack.packb([0.0, [["BlockStored", "bad"], ["Unheard", 1]]]))
    send(events, 2, encode_batch(0.0, [BlockStored((1, 2, 3, 4), None, ids, 16)]))
    poll("the good batch applied", lambda: blocks_of(stack, "noisy"), lambda n: n == 4)
    send(events, 9, encode_batch(0.0, []))  # batches 3..8 lost, and no replay socket
    poll("the noisy pod distrusted", stack.kv_view, lambda view: not view["kv-noisy"]["trusted"])
    assert metric_value(stack.processor, "gateway_kv_events_malformed_total", what="message") == (
        malformed + 2
    )
    assert metric_value(stack.processor, "gateway_kv_event_gaps_total") == gaps + 1
    # Every request is still answered, by every pod, while the noisy one is distrusted.
    served = {through_gateway(stack, chat("hi", f"question {i}")) for i in range(30)}
    assert served <= {"a", "b", "c", "noisy"} and len(served) > 1
    send(events, 10, encode_batch(0.0, [AllBlocksCleared()]))  # rebuilt
    poll("trusted again", stack.kv_view, lambda view: view["kv-noisy"]["trusted"])
    send(events, 0, encode_batch(0.0, []))  # the publisher started again
    poll("the restart seen", stack.kv_view, lambda view: view["kv-noisy"]["last_seq"] == 0)
    assert http_request(stack.processor.admin_port, "GET", "/healthz").status == 200
    assert stack.processor.process.alive()
