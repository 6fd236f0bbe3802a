"""Prefix placements shared by replicas through Redis pub/sub (`serve --redis-url`).

Without KV-cache events the prefix indexes know only what this processor sent where, so
two replicas behind one Envoy each see half the placements: they put one prompt on two
pods and tight caches hold it twice. Here every placement a prefix index records
(`routing.prefix.Placements`, wired by server.py: index name, pod key, the prompt's block hashes) is
published on a channel, and the placements the other replicas publish are recorded
into the same index, so every replica's index sees every placement. The block hashes
agree across processes because every replica seeds them alike (`placement_seed`).

Routing never waits on Redis: placements are queued and published by a background task,
a batch per PUBLISH (what gathered within `BATCH_S`, at most `BATCH_MAX`). While Redis is
unreachable each replica routes on its own placements (warned once a minute, counted as
dropped) and sharing resumes when Redis is back, retried with backoff.

Message: a version byte, then msgpack `[origin, [[index, pod, hashes], ...]]`, where
`origin` (8 random bytes per process) tells this replica's own messages from the
others' and `hashes` is the block hashes packed as little-endian uint64s. A message
that does not parse, of another version, or naming no index here is counted and
skipped: the channel may be shared with whatever else uses this Redis. A placement on a
pod this replica does not know (deleted here, not discovered yet) is skipped too.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import redis.asyncio as aioredis
from prometheus_client import Counter

from gateway_extproc.redis_channel import RETRY_MAX_S, RETRY_MIN_S, RedisChannel, connect

CHANNEL = "gateway-extproc:placements"
VERSION = 1
BATCH_S = 0.005  # a placement waits at most this long for others to share a PUBLISH
BATCH_MAX = 64  # placements per message (each up to 512 hashes, 4 KB)
QUEUE_MAX = 10_000  # placements waiting to be published; beyond it they stay local

PLACEMENTS = Counter(
    "gateway_shared_placements_total",
    "Prefix placements shared through Redis (--redis-url): published (this replica's), "
    "applied (another replica's, recorded here), unknown_pod (another replica's, on a "
    "pod this one does not know: skipped), dropped (not published: Redis down or the "
    "queue full).",
    ["outcome"],
)
REJECTED = Counter(
    "gateway_shared_placement_messages_rejected_total",
    "Messages on the placements channel skipped: malformed, of another version, or "
    "naming a prefix index this processor does not have.",
)


def placement_seed(redis_url: str) -> int:
    """The block-hash seed every replica sharing this Redis derives alike. Secret as far
    as the URL is (give Redis a password: redis://:PASSWORD@host:6379/0)."""
    digest = hashlib.blake2b(redis_url.encode(), digest_size=8, person=b"gw-place").digest()
    return int.from_bytes(digest, "little")


def encode(origin: bytes, batch: list[tuple[str, str, list[int]]]) -> bytes:
    body = [[name, pod, struct.pack(f"<{len(h)}Q", *h)] for name, pod, h in batch]
    return bytes([VERSION]) + msgpack.packb([origin, body], use_bin_type=True)


def decode(data: bytes) -> tuple[bytes, list[tuple[str, str, list[int]]]]:
    """The message's origin and placements; ValueError when it is not one of ours."""
    if not isinstance(data, bytes) or not data or data[0] != VERSION:
        raise ValueError("not a version-1 placements message")
    try:
        origin, body = msgpack.unpackb(data[1:], raw=False, use_list=True)
    except Exception as exc:  # msgpack raises several types for garbage
        raise ValueError(f"malformed: {exc!r}") from None
    if not isinstance(origin, bytes) or not isinstance(body, list):
        raise ValueError("malformed: wrong shape")
    out: list[tuple[str, str, list[int]]] = []
    for item in body:
        if not (isinstance(item, list) and len(item) == 3):
            raise ValueError("malformed: wrong placement shape")
        name, pod, packed = item
        if not (isinstance(name, str) and isinstance(pod, str) and isinstance(packed, bytes)):
            raise ValueError("malformed: wrong placement types")
        if len(packed) % 8:
            raise ValueError("malformed: hashes not whole uint64s")
        out.append((name, pod, list(struct.unpack(f"<{len(packed) // 8}Q", packed))))
    return origin, out


class SharedPlacements(RedisChannel):
    unavailable_event = "redis_placements_unavailable"
    unavailable_hint = "each replica routes on its own prefix placements until Redis answers"

    def __init__(
        self,
        url: str,
        apply: Callable[[str, str, list[int]], bool],
        *,
        knows_pod: Callable[[str], bool] = lambda _: True,
        channel: str = CHANNEL,
    ) -> None:
        super().__init__(connect(url), channel)
        # Records another replica's placement (index name, pod, hashes); False when
        # this processor has no index of that name.
        self._apply = apply
        # A placement on a pod this replica does not know (deleted here, not discovered
        # yet) is skipped: recording it would bring back a deleted pod's index entries.
        self._knows_pod = knows_pod
        self.origin = secrets.token_bytes(8)
        self._pending: list[tuple[str, str, list[int]]] = []
        self._wake = asyncio.Event()

    def placed(self, name: str, pod_key: str, hashes: list[int]) -> None:
        """Queue a placement made here for publishing (never blocks)."""
        if len(self._pending) >= QUEUE_MAX:
            PLACEMENTS.labels("dropped").inc()
            return
        self._pending.append((name, pod_key, hashes))
        self._wake.set()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._publish_forever(), name="redis-placements-publisher"),
            asyncio.create_task(self._listen_forever(), name="redis-placements-listener"),
        ]

    async def _publish_forever(self) -> None:
        retry = RETRY_MIN_S
        while True:
            await self._wake.wait()
            await asyncio.sleep(BATCH_S)  # let the placements of a burst share messages
            self._wake.clear()
            pending, self._pending = self._pending, []
            sent = 0
            try:
                while sent < len(pending):
                    batch = pending[sent : sent + BATCH_MAX]
                    await self._client.publish(self._channel, encode(self.origin, batch))
                    sent += len(batch)
                    PLACEMENTS.labels("published").inc(len(batch))
                retry = RETRY_MIN_S
            except (aioredis.RedisError, OSError) as exc:
                # What was not sent stays local: an old placement is worth less than
                # a fresh one once Redis answers again.
                PLACEMENTS.labels("dropped").inc(len(pending) - sent)
                self._warn(exc)
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX_S)

    def on_message(self, data: Any) -> None:
        """Record the placements of another replica's message; count and skip the rest."""
        try:
            origin, placements = decode(data)
        except ValueError:
            REJECTED.inc()
            return
        if origin == self.origin:
            return
        applied = unknown = foreign = 0
        for name, pod, hashes in placements:
            if not self._knows_pod(pod):
                unknown += 1
            elif self._apply(name, pod, hashes):
                applied += 1
            else:
                foreign += 1
        PLACEMENTS.labels("applied").inc(applied)
        if unknown:
            PLACEMENTS.labels("unknown_pod").inc(unknown)
        if foreign:
            REJECTED.inc()  # names an index this processor does not have
