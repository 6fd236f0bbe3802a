"""The simulator's KV-cache event publisher: vLLM's ZMQ publisher, in the same wire format.

Events the KV cache reports are gathered and sent as one batch per event-loop turn (an
engine step in vLLM) on a PUB socket as `[topic, seq, payload]`; the last `buffer`
batches are kept and served on a ROUTER replay socket, as vLLM's `ZmqEventPublisher`
does: a request `[identity, empty, start seq]` is answered with `[identity, empty, seq,
payload]` per batch held from `start` on, then the end marker (seq -1, empty payload).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

import structlog
import zmq
import zmq.asyncio

from gateway_extproc.kvevents.wire import END_OF_REPLAY, SEQ_BYTES, Event, encode_batch, message

log = structlog.get_logger(__name__)


class EventPublisher:
    def __init__(
        self,
        host: str,
        port: int,
        replay_port: int | None = None,
        *,
        topic: bytes = b"kv-events",
        buffer: int = 10_000,
    ) -> None:
        self.host = host
        self.port = port
        self.replay_port = replay_port
        self.topic = topic
        self._context = zmq.asyncio.Context()
        self._pub: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer)
        self._pending: list[Event] = []
        self._flush_scheduled = False
        self._seq = 0
        self._replays: asyncio.Task[None] | None = None
        # A fault: the next this-many batches are kept for replay but never sent, as if
        # the network lost them (subscribers see a sequence gap).
        self.drop_next = 0

    async def start(self) -> tuple[int, int | None]:
        """Bind; returns the (events, replay) ports actually bound (0 picks free ones)."""
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self.port = _bind(self._pub, self.host, self.port)
        if self.replay_port is not None:
            self._router = self._context.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self.replay_port = _bind(self._router, self.host, self.replay_port)
            self._replays = asyncio.get_running_loop().create_task(self._serve_replays())
        return self.port, self.replay_port

    async def close(self) -> None:
        if self._replays is not None:
            self._replays.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replays
        self._context.destroy(linger=0)

    def publish(self, event: Event) -> None:
        """Queue `event`; the batch goes out when the loop next gets a turn."""
        self._pending.append(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        events, self._pending = self._pending, []
        if not events or self._pub is None:
            return
        payload = encode_batch(time.time(), events)
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        if self.drop_next > 0:
            self.drop_next -= 1
            return
        # A PUB socket never blocks: with no subscriber, or one too slow, it drops.
        self._pub.send_multipart(message(self.topic, seq, payload), flags=zmq.NOBLOCK)

    async def _serve_replays(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != SEQ_BYTES:
                log.warning("simulator_replay_request_invalid", frames=len(frames))
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await self._router.send_multipart(
                        [identity, b"", seq.to_bytes(SEQ_BYTES, "big"), payload]
                    )
            await self._router.send_multipart([identity, b"", END_OF_REPLAY, b""])


def _bind(socket: zmq.asyncio.Socket, host: str, port: int) -> int:
    address = f"[{host}]" if ":" in host else host
    if port == 0:
        return socket.bind_to_random_port(f"tcp://{address}")
    socket.bind(f"tcp://{address}:{port}")
    return port
