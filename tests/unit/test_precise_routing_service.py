"""Precise prefix routing inside the running processor: real gRPC streams, engines'
events over real ZMQ, prompts tokenized with the model's tokenizer off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from gateway_extproc.devtools.simulator.kv_events import EventPublisher
from gateway_extproc.kvevents.wire import BlockStored
from gateway_extproc.server import Gateway, start_gateway, stop_gateway
from gateway_extproc.tokenize.tokenizer import ModelTokenizer
from tests import frames
from tests.settings import loopback_settings
from tests.waiting import eventually

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"
SIZE = 16
DOCUMENT = "the quick brown fox jumps over the lazy dog policy customer support\n" * 800  # 55 KB
STRATEGY = {"routing-strategy": "precise-prefix-cache"}


def chat_body(question: str) -> bytes:
    return orjson.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": DOCUMENT},
                {"role": "user", "content": question},
            ],
        }
    )


@pytest.fixture
async def engines() -> AsyncIterator[list[EventPublisher]]:
    publishers = [EventPublisher("127.0.0.1", 0, 0) for _ in range(3)]
    for publisher in publishers:
        await publisher.start()
    yield publishers
    for publisher in publishers:
        await publisher.close()


async def start_fleet(tmp_path: Path, engines: list[EventPublisher], **settings: Any) -> Gateway:
    """A gateway over one model served by `engines`, each publishing its KV-cache events."""
    pods = "\n".join(
        f"      - {{name: e{i}, address: 127.0.0.1:{18101 + i}, "
        f"kv_events: 'tcp://127.0.0.1:{e.port}', kv_events_replay: 'tcp://127.0.0.1:{e.replay_port}'}}"
        for i, e in enumerate(engines)
    )
    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  - name: m\n    tokenizer: {TINY}\n    pods:\n{pods}\n")
    return await start_gateway(
        loopback_settings(
            models_file=str(path),
            grace_period=1.0,
            access_log=False,
            slow_start_window=0.0,  # no engine metrics here: no pod is ramping up
            **settings,
        )
    )


@pytest.fixture
async def gateway(tmp_path: Path, engines: list[EventPublisher]) -> AsyncIterator[Gateway]:
    gateway = await start_fleet(tmp_path, engines)
    yield gateway
    await stop_gateway(gateway)


@pytest.fixture
async def full_gateway(tmp_path: Path, engines: list[EventPublisher]) -> AsyncIterator[Gateway]:
    """The same fleet with room for one request per pod (flow control holds the rest)."""
    gateway = await start_fleet(tmp_path, engines, max_inflight_per_pod=1)
    yield gateway
    await stop_gateway(gateway)


async def every_stream(gateway: Gateway, state: str) -> None:
    """Wait until every pod's KV-event stream is `state` ("connected", "trusted")."""
    await eventually(
        lambda: all(s[state] for s in gateway.kv_events.streams().values()),
        what=f"every stream {state}",
    )


async def engine_served(gateway: Gateway, engine: EventPublisher, pod: str, body: bytes) -> None:
    """The engine cached the request's full blocks and published them."""
    ids = ModelTokenizer.load(TINY).prompt_ids("/v1/chat/completions", orjson.loads(body))
    assert ids is not None
    blocks = len(ids) // SIZE
    engine.publish(
        BlockStored(tuple(range(blocks)), None, tuple(ids[: blocks * SIZE]), SIZE, medium="GPU")
    )
    await eventually(
        lambda: gateway.kv_events.streams()[pod]["blocks"] == blocks, what="the blocks indexed"
    )


async def process(gateway: Gateway, sent: list) -> list:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = ext_grpc.ExternalProcessorStub(channel)
        return [r async for r in stub.Process(iter(sent))]


async def test_a_long_chat_goes_to_the_engine_holding_its_prefix(gateway, engines) -> None:
    await every_stream(gateway, "trusted")
    await engine_served(gateway, engines[2], "e2", chat_body("first question"))
    for question in ("second question", "a third one"):
        got = await process(
            gateway,
            [frames.request_headers(headers=STRATEGY), frames.request_body(chat_body(question))],
        )
        assert [r.WhichOneof("response") for r in got] == ["request_headers", "request_body"]
        assert frames.set_headers(got[1])["target-pod"] == "127.0.0.1:18103"


async def test_with_trailers_the_body_and_trailers_answers_come_in_order(gateway, engines) -> None:
    await every_stream(gateway, "trusted")
    await engine_served(gateway, engines[1], "e1", chat_body("first question"))
    got = await process(
        gateway,
        [
            frames.request_headers(headers=STRATEGY),
            frames.request_body(chat_body("next"), end_of_stream=False),
            frames.request_trailers(),
            frames.response_headers(200),
            frames.response_body(b"{}", end_of_stream=True),
        ],
    )
    assert [r.WhichOneof("response") for r in got] == [
        "request_headers",
        "request_body",
        "request_trailers",
        "response_headers",
        "response_body",
    ]
    assert frames.set_headers(got[1])["target-pod"] == "127.0.0.1:18102"
    assert gateway.inflight.total() == 0


async def test_debug_view_shows_each_pods_stream(gateway, engines) -> None:
    await every_stream(gateway, "connected")
    view = gateway.kv_events.streams()
    assert set(view) == {"e0", "e1", "e2"}
    assert view["e0"]["endpoint"] == f"tcp://127.0.0.1:{engines[0].port}"


async def test_a_prepared_prompt_can_then_wait_for_room(full_gateway, engines) -> None:
    """Both waits in a row: the prompt is tokenized off the loop, then flow control holds
    the request until a pod frees; the answer comes once, routed."""
    gateway = full_gateway
    await every_stream(gateway, "trusted")
    await engine_served(gateway, engines[0], "e0", chat_body("first question"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = ext_grpc.ExternalProcessorStub(channel)
        busy, pods = [], []
        for _ in range(3):  # every pod gets one request in flight
            call = stub.Process()
            await call.write(frames.request_headers())
            await call.read()
            await call.write(frames.request_body(orjson.dumps({"model": "m", "prompt": "hi"})))
            routed = await call.read()
            assert routed.WhichOneof("response") == "request_body"
            busy.append(call)
            pods.append(frames.set_headers(routed)["target-pod"])
        assert sorted(pods) == ["127.0.0.1:18101", "127.0.0.1:18102", "127.0.0.1:18103"]
        held = stub.Process()
        await held.write(frames.request_headers(headers=STRATEGY))
        await held.read()
        await held.write(frames.request_body(chat_body("second question")))
        notice = await asyncio.wait_for(held.read(), 10.0)
        assert notice.WhichOneof("response") is None  # held: only the timeout notice
        assert gateway.flow.held == 1
        busy[0].cancel()  # one request ends: its pod has room
        answer = await asyncio.wait_for(held.read(), 10.0)
        assert answer.WhichOneof("response") == "request_body"
        assert frames.set_headers(answer)["target-pod"] == pods[0]  # the one with room
        for call in (*busy[1:], held):
            call.cancel()
    await eventually(lambda: gateway.inflight.total() == 0, what="nothing in flight")
