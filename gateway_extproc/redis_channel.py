"""RedisChannel: what the replicas' shared state over Redis pub/sub has in common
(`redis_sessions`, `redis_placements`): one client, a channel listened to for ever with
backoff while Redis is away, at most one warning a minute about it, and the background
tasks stopped together. Each user builds its client, says what to do with a message
(`on_message`) and names its warning."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
import structlog

log = structlog.get_logger("gateway_extproc.redis")

# A Redis that does not answer within this is treated as down (routing never waits).
SOCKET_TIMEOUT_S = 0.5
RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0
WARN_EVERY_S = 60.0


def connect(url: str, *, decode_responses: bool = False) -> Any:
    return aioredis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        decode_responses=decode_responses,
    )


class RedisChannel:
    # The warning logged (at most once a minute) while Redis is unreachable, and its hint.
    unavailable_event = "redis_unavailable"
    unavailable_hint = ""

    def __init__(self, client: Any, channel: str) -> None:
        self._client = client
        self._channel = channel
        self._tasks: list[asyncio.Task[None]] = []
        self._warned_at = float("-inf")
        self.subscribed = asyncio.Event()

    def on_message(self, data: Any) -> None:
        """A message on the channel (anyone's: the channel may be shared)."""
        raise NotImplementedError

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._client.aclose()

    async def _listen_forever(self) -> None:
        retry = RETRY_MIN_S
        while True:
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    self.subscribed.set()
                    retry = RETRY_MIN_S
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.on_message(message.get("data"))
            except (aioredis.RedisError, OSError) as exc:
                self.subscribed.clear()
                self._warn(exc)
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX_S)

    def _warn(self, exc: BaseException) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(self.unavailable_event, problem=repr(exc), hint=self.unavailable_hint)
