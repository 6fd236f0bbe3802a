"""KVEventSubscriber over real ZMQ sockets on loopback: events fill the index, lost
batches are replayed or make the pod's index untrusted until rebuilt, dead sockets fall
back, and nothing a publisher sends can crash it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import msgpack
import pytest
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY

from gateway_extproc.devtools.localstack import free_port
from gateway_extproc.devtools.simulator.kv_events import EventPublisher
from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.kvevents.keys import chain_keys, root_key
from gateway_extproc.kvevents.subscriber import KVEventSubscriber
from gateway_extproc.kvevents.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    encode_batch,
    message,
)
from gateway_extproc.models.registry import ModelRegistry, Pod
from tests.waiting import eventually

SIZE = 4
TOKENS = list(range(1000, 1032))  # eight blocks
KEYS = chain_keys(root_key(None), TOKENS, SIZE)
POD = "pod-a"


def stored(first: int, count: int) -> BlockStored:
    """Blocks first..first+count-1 of TOKENS, engine hashes 100 + block number."""
    return BlockStored(
        block_hashes=tuple(100 + i for i in range(first, first + count)),
        parent_hash=100 + first - 1 if first else None,
        token_ids=tuple(TOKENS[first * SIZE : (first + count) * SIZE]),
        block_size=SIZE,
        medium="GPU",
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class RawPublisher:
    """A test-driven XPUB socket: sends whatever frames a test wants, in the order it
    wants, once the subscriber's subscription has arrived (no slow-joiner loss)."""

    def __init__(self, context: zmq.asyncio.Context, port: int) -> None:
        self.port = port
        self.socket = context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(f"tcp://127.0.0.1:{port}")

    async def subscribed(self) -> None:
        frame = await asyncio.wait_for(self.socket.recv(), 10)
        assert frame[:1] == b"\x01"

    async def send(self, seq: int, events: Sequence[Event]) -> None:
        await self.raw(message(b"kv", seq, encode_batch(1.0, events)))

    async def raw(self, frames: list[bytes]) -> None:
        await self.socket.send_multipart(frames)

    def close(self) -> None:
        self.socket.close(linger=0)


@pytest.fixture
async def context() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[ModelRegistry, KVBlockIndex, KVEventSubscriber]]:
    registry = ModelRegistry()
    index = KVBlockIndex()
    subscriber = KVEventSubscriber(registry, index, dead_after=0.5, replay_timeout=2.0)
    subscriber.start()
    yield registry, index, subscriber
    await subscriber.stop()


def add_pod(registry: ModelRegistry, port: int, replay: int | None = None, name: str = POD) -> None:
    registry.upsert_pod(
        Pod(
            name,
            "127.0.0.1:8000",
            ("m",),
            kv_events=f"tcp://127.0.0.1:{port}",
            kv_events_replay=f"tcp://127.0.0.1:{replay}" if replay else "",
        )
    )


def depth(index: KVBlockIndex, pod: str = POD) -> int:
    return index.longest_prefixes(KEYS, [pod]).get(pod, 0)


async def publishing_pod(context: zmq.asyncio.Context, registry: ModelRegistry) -> RawPublisher:
    """A raw publisher on a fresh port, the pod that names it added, and subscribed to."""
    port = free_port()
    publisher = RawPublisher(context, port)
    add_pod(registry, port)
    await publisher.subscribed()
    return publisher


@contextlib.asynccontextmanager
async def simulator_publisher(**kwargs: int) -> AsyncIterator[EventPublisher]:
    publisher = EventPublisher("127.0.0.1", 0, 0, **kwargs)
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.close()


async def test_stored_and_removed_blocks_show_in_the_index(context, gateway) -> None:
    registry, index, _ = gateway
    publisher = await publishing_pod(context, registry)
    await eventually(lambda: index.trusted(POD), what="the pod trusted once connected")
    pod_blocks = index.pod(POD)
    assert pod_blocks is not None and pod_blocks.model == "m"  # whose tokenizer decodes them
    await publisher.send(0, [stored(0, 4)])
    await eventually(lambda: depth(index) == 4, what="four blocks")
    await publisher.send(1, [BlockRemoved((102,), "GPU")])
    await eventually(lambda: depth(index) == 2, what="the prefix cut at the removed block")
    await publisher.send(2, [AllBlocksCleared()])
    await eventually(lambda: depth(index) == 0, what="nothing left")
    assert index.trusted(POD)
    publisher.close()


async def test_a_gap_without_replay_distrusts_the_pod_until_its_cache_is_cleared(
    context, gateway
) -> None:
    registry, index, _ = gateway
    gaps = sample("gateway_kv_event_gaps_total")
    publisher = await publishing_pod(context, registry)
    await publisher.send(0, [stored(0, 2)])
    await eventually(lambda: depth(index) == 2, what="two blocks")
    await publisher.send(5, [stored(2, 1)])  # batches 1..4 lost
    await eventually(lambda: not index.trusted(POD), what="the pod distrusted")
    assert sample("gateway_kv_event_gaps_total") == gaps + 1
    assert sample("gateway_kv_event_unreliable_pods") == 1
    await publisher.send(6, [stored(3, 1)])  # later batches do not make it whole again
    await asyncio.sleep(0.05)
    assert not index.trusted(POD)
    await publisher.send(7, [AllBlocksCleared(), stored(0, 1)])  # rebuilt
    await eventually(lambda: index.trusted(POD), what="trusted again")
    assert depth(index) == 1
    publisher.close()


async def test_a_gap_is_filled_from_the_replay_endpoint(gateway) -> None:
    registry, index, _ = gateway
    filled = sample("gateway_kv_event_replays_total", outcome="filled")
    async with simulator_publisher() as publisher:
        add_pod(registry, publisher.port, publisher.replay_port)
        await eventually(lambda: index.trusted(POD), what="connected")
        publisher.publish(stored(0, 1))
        await eventually(lambda: depth(index) == 1, what="one block")
        publisher.drop_next = 2  # the network loses the next two batches
        publisher.publish(stored(1, 1))
        await asyncio.sleep(0)  # one batch per loop turn
        publisher.publish(stored(2, 1))
        await asyncio.sleep(0)
        publisher.publish(stored(3, 1))
        await eventually(lambda: depth(index) == 4, what="all four blocks, two of them replayed")
        assert index.trusted(POD)
        assert sample("gateway_kv_event_replays_total", outcome="filled") == filled + 1


async def test_a_replay_that_no_longer_holds_the_lost_batches_distrusts_the_pod(gateway) -> None:
    registry, index, _ = gateway
    incomplete = sample("gateway_kv_event_replays_total", outcome="incomplete")
    async with simulator_publisher(buffer=1) as publisher:
        add_pod(registry, publisher.port, publisher.replay_port)
        await eventually(lambda: index.trusted(POD), what="connected")
        publisher.publish(stored(0, 1))
        await eventually(lambda: depth(index) == 1, what="one block")
        publisher.drop_next = 2
        for first in (1, 2, 3):
            publisher.publish(stored(first, 1))
            await asyncio.sleep(0)
        await eventually(lambda: not index.trusted(POD), what="the pod distrusted")
        assert sample("gateway_kv_event_replays_total", outcome="incomplete") == incomplete + 1


async def test_a_subscriber_that_joins_late_replays_what_it_missed(gateway) -> None:
    registry, index, _ = gateway
    async with simulator_publisher() as publisher:
        publisher.publish(stored(0, 2))  # nobody listens yet: lost on the PUB socket
        await asyncio.sleep(0.05)
        add_pod(registry, publisher.port, publisher.replay_port)
        await eventually(lambda: index.trusted(POD), what="connected")
        publisher.publish(stored(2, 1))
        await eventually(lambda: depth(index) == 3, what="the early blocks replayed")


async def test_a_restarted_publisher_starts_the_index_afresh(context, gateway) -> None:
    registry, index, _ = gateway
    publisher = await publishing_pod(context, registry)
    for seq in range(3):
        await publisher.send(seq, [stored(seq, 1)])
    await eventually(lambda: depth(index) == 3, what="three blocks")
    publisher.close()
    await eventually(lambda: not index.trusted(POD), what="distrusted while disconnected")
    restarted = RawPublisher(context, publisher.port)
    await restarted.subscribed()
    await restarted.send(0, [stored(0, 1)])  # a new engine: its sequence starts over
    await eventually(lambda: depth(index) == 1, what="the old blocks gone, the new one in")
    assert index.trusted(POD)
    restarted.close()


async def test_a_reconnection_without_replay_is_trusted_once_the_next_batch_follows(
    context, gateway
) -> None:
    registry, index, _ = gateway
    publisher = await publishing_pod(context, registry)
    await publisher.send(0, [stored(0, 1)])
    await eventually(lambda: depth(index) == 1, what="one block")
    publisher.close()
    await eventually(lambda: not index.trusted(POD), what="distrusted while disconnected")
    again = RawPublisher(context, publisher.port)
    await again.subscribed()
    await asyncio.sleep(0.05)
    assert not index.trusted(POD)  # connected, but whether batches were lost is unknown
    await again.send(1, [stored(1, 1)])
    await eventually(lambda: index.trusted(POD), what="trusted: nothing was lost")
    assert depth(index) == 2
    again.close()


async def test_garbage_is_counted_and_skipped_and_the_stream_goes_on(context, gateway) -> None:
    registry, index, subscriber = gateway
    before = {
        what: sample("gateway_kv_events_malformed_total", what=what)
        for what in ("message", "payload", "event")
    }
    publisher = await publishing_pod(context, registry)
    await publisher.raw([b"only one frame"])
    await publisher.raw([b"kv", b"\x00\x01", b"payload"])  # a 2-byte sequence number
    await publisher.raw([b"kv", (0).to_bytes(8, "big"), b"\xc1\xc1 not msgpack"])
    bad_event = msgpack.packb([1.0, [["BlockStored", [1], None, [1, 2, 3], 4], ["Nope"]]])
    await publisher.raw([b"kv", (1).to_bytes(8, "big"), bad_event])
    await publisher.send(2, [stored(0, 3)])
    await eventually(lambda: depth(index) == 3, what="the good batch applied")
    assert sample("gateway_kv_events_malformed_total", what="message") == before["message"] + 2
    assert sample("gateway_kv_events_malformed_total", what="payload") == before["payload"] + 1
    assert sample("gateway_kv_events_malformed_total", what="event") == before["event"] + 1
    assert index.trusted(POD)
    assert subscriber.streams()[POD]["last_seq"] == 2
    publisher.close()


async def test_a_dead_socket_is_counted_and_falls_back_until_the_publisher_appears(
    context, gateway
) -> None:
    registry, index, subscriber = gateway
    dead = sample("gateway_kv_event_dead_streams_total")
    port = free_port()  # nothing listens there
    add_pod(registry, port)
    await eventually(lambda: subscriber.streams()[POD]["dead"] is True, what="declared dead")
    assert sample("gateway_kv_event_dead_streams_total") == dead + 1
    assert not index.trusted(POD)
    publisher = RawPublisher(context, port)
    await publisher.subscribed()
    await eventually(lambda: index.trusted(POD), what="recovered and trusted")
    assert subscriber.streams()[POD]["dead"] is False
    publisher.close()


async def test_a_deleted_pod_loses_its_stream_and_blocks_and_a_moved_one_resubscribes(
    context, gateway
) -> None:
    registry, index, subscriber = gateway
    publisher = await publishing_pod(context, registry)
    await publisher.send(0, [stored(0, 2)])
    await eventually(lambda: depth(index) == 2, what="two blocks")
    other = await publishing_pod(context, registry)  # the same pod, publishing elsewhere
    assert depth(index) == 0  # what the old endpoint said is gone
    await other.send(0, [stored(0, 1)])
    await eventually(lambda: depth(index) == 1, what="one block from the new endpoint")
    registry.delete_pod(POD)
    assert index.pod(POD) is None and POD not in subscriber.streams()
    await other.send(1, [stored(1, 1)])  # from a pod the gateway no longer knows
    await asyncio.sleep(0.05)
    assert index.pod(POD) is None
    publisher.close()
    other.close()


async def test_only_pods_with_an_endpoint_that_are_not_terminating_are_followed(gateway) -> None:
    registry, index, subscriber = gateway
    registry.upsert_pod(Pod("plain", "127.0.0.1:8000", ("m",)))
    add_pod(registry, free_port(), name="going")
    assert set(subscriber.streams()) == {"going"}
    pod = registry.pod("going")
    assert pod is not None
    registry.upsert_pod(
        Pod(pod.name, pod.address, pod.models, terminating=True, kv_events=pod.kv_events)
    )
    assert subscriber.streams() == {} and index.pod("going") is None
