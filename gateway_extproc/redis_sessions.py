"""Session affinity shared by replicas through Redis (`serve --redis-url`).

A session one replica places on a pod (or moves) is written to Redis as
`<prefix>:<session id>` -> pod key, kept `ttl` seconds after its last placement, and
announced on a channel; every replica listens and learns it into its own session map.
So a conversation whose next request Envoy sends to another replica (or worker) stays
on its pod. A replica that starts loads the sessions already in Redis.

Routing never waits on Redis: it reads only its own map, and writes are queued and sent
by a background task. While Redis is unreachable each replica keeps its own sessions
(warned once a minute) and sharing resumes when Redis is back. Only session ids and pod
keys travel; nothing here decides a route.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog

from gateway_extproc.redis_channel import RedisChannel, connect

log = structlog.get_logger("gateway_extproc.redis_sessions")

KEY_PREFIX = "gateway-extproc:session"
CHANNEL = "gateway-extproc:sessions"
TTL_S = 3600
QUEUE_MAX = 10_000  # placements waiting to be written; beyond it they stay local
RETRY_S = 1.0


class SharedSessions(RedisChannel):
    unavailable_event = "redis_sessions_unavailable"
    unavailable_hint = "sessions stay per replica until Redis answers"

    def __init__(
        self,
        url: str,
        learn: Callable[[str, str], None],
        *,
        ttl: int = TTL_S,
        prefix: str = KEY_PREFIX,
        channel: str = CHANNEL,
        warm_limit: int = 100_000,
    ) -> None:
        super().__init__(connect(url, decode_responses=True), channel)
        self._learn = learn
        self._ttl = ttl
        self._prefix = prefix
        self._warm_limit = warm_limit
        # Tells this replica's own announcements from the others'.
        self._origin = secrets.token_hex(8)
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(maxsize=QUEUE_MAX)

    def placed(self, session: str, pod_key: str) -> None:
        """The affinity's `on_pick`: share a session placed here (never blocks)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait((session, pod_key))

    async def start(self) -> None:
        try:
            await self._warm()
        except (aioredis.RedisError, OSError) as exc:
            self._warn(exc)
        self._tasks = [
            asyncio.create_task(self._write_forever(), name="redis-sessions-writer"),
            asyncio.create_task(self._listen_forever(), name="redis-sessions-listener"),
        ]

    async def _warm(self) -> None:
        """Learn the sessions other replicas placed before this one started."""
        learned = 0
        async for key in self._client.scan_iter(match=f"{self._prefix}:*", count=1000):
            pod = await self._client.get(key)
            if pod:
                self._learn(key[len(self._prefix) + 1 :], pod)
                learned += 1
            if learned >= self._warm_limit:
                break
        log.info("redis_sessions_loaded", sessions=learned)

    async def _write_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 256:
                batch.append(self._queue.get_nowait())
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for session, pod in batch:
                        pipe.set(f"{self._prefix}:{session}", pod, ex=self._ttl)
                        pipe.publish(self._channel, orjson.dumps([self._origin, session, pod]))
                    await pipe.execute()
            except (aioredis.RedisError, OSError) as exc:
                self._warn(exc)
                await asyncio.sleep(RETRY_S)

    def on_message(self, data: Any) -> None:
        try:
            origin, session, pod = orjson.loads(data)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return  # not ours: the channel is shared with whatever else uses this Redis
        if origin != self._origin and isinstance(session, str) and isinstance(pod, str):
            self._learn(session, pod)
