"""Asking an engine's replay socket for event batches the subscriber missed.

vLLM's publisher keeps its last batches (10,000 by default) and serves them on a ROUTER
socket: a request is one frame, the first sequence number wanted as 8 bytes big-endian,
behind the empty delimiter frame a REQ socket would add; the answer is one message
`[empty, seq, payload]` per batch still held from that number on, then `[empty, -1 as 8
signed bytes, empty]`. A REQ socket would take only the first answer, so this asks
through a DEALER and writes the delimiter itself.
"""

from __future__ import annotations

import asyncio
import contextlib

import zmq
import zmq.asyncio

from gateway_extproc.kvevents.wire import END_OF_REPLAY, SEQ_BYTES, WireError

# The most batches one replay may bring: the publisher's default buffer.
MAX_REPLAYED = 10_000


async def request_replay(
    context: zmq.asyncio.Context, endpoint: str, start: int, *, timeout: float
) -> list[tuple[int, bytes]]:
    """(seq, payload) of the batches the publisher still holds from `start` on, in order.

    Raises TimeoutError when the whole answer does not arrive within `timeout` seconds,
    WireError when it is not the replay protocol, zmq.ZMQError for a bad endpoint."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, 256 * 1024 * 1024)
    try:
        socket.connect(endpoint)
        await socket.send_multipart([b"", start.to_bytes(SEQ_BYTES, "big")])
        async with asyncio.timeout(timeout):
            return await _collect(socket)
    finally:
        with contextlib.suppress(zmq.ZMQError):
            socket.close(linger=0)


async def _collect(socket: zmq.asyncio.Socket) -> list[tuple[int, bytes]]:
    batches: list[tuple[int, bytes]] = []
    while True:
        frames = await socket.recv_multipart()
        if len(frames) != 3 or frames[0] != b"" or len(frames[1]) != SEQ_BYTES:
            raise WireError("a replay answer is [empty, seq, payload]")
        if frames[1] == END_OF_REPLAY:
            return batches
        if len(batches) >= MAX_REPLAYED:
            raise WireError(f"the replay sent more than {MAX_REPLAYED} batches")
        batches.append((int.from_bytes(frames[1], "big"), frames[2]))
