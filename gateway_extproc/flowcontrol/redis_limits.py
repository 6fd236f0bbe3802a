"""Rate-limit windows kept in Redis, so that every replica counts into the same ones.

One hash per tenant and window, `<prefix>:<window seconds>:<window index>:<tenant>`,
with fields `r` (requests let through) and `t` (tokens used); it expires two windows
after it was last written. The check and the count are one Lua script, atomic in Redis,
so two replicas can never both take the last request of a window.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from gateway_extproc.flowcontrol.config import TenantLimits
from gateway_extproc.flowcontrol.limits import WindowUse

KEY_PREFIX = "gateway-extproc:ratelimit"
# A Redis that does not answer within this costs a request at most this long (the
# limiter then lets it through).
SOCKET_TIMEOUT_S = 0.5

_TAKE = """
local r = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
local t = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
local request_limit = tonumber(ARGV[1])
local token_limit = tonumber(ARGV[2])
if (request_limit > 0 and r >= request_limit) or (token_limit > 0 and t >= token_limit) then
  return {0, r, t}
end
r = redis.call('HINCRBY', KEYS[1], 'r', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, r, t}
"""


class RedisWindows:
    def __init__(self, url: str, prefix: str = KEY_PREFIX) -> None:
        self._client: Any = aioredis.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
        )
        self._take = self._client.register_script(_TAKE)
        self._prefix = prefix

    async def ping(self) -> None:
        await self._client.ping()

    async def take(self, tenant: str, index: int, window: float, limits: TenantLimits) -> WindowUse:
        allowed, requests, tokens = await self._take(
            keys=[self._key(tenant, index, window)],
            args=[limits.requests, limits.tokens, _ttl_ms(window)],
        )
        return WindowUse(bool(allowed), int(requests), int(tokens))

    async def add_tokens(self, tenant: str, index: int, window: float, tokens: int) -> None:
        key = self._key(tenant, index, window)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, "t", tokens)
            pipe.pexpire(key, _ttl_ms(window))
            await pipe.execute()

    async def close(self) -> None:
        await self._client.aclose()

    def _key(self, tenant: str, index: int, window: float) -> str:
        return f"{self._prefix}:{window:g}:{index}:{tenant}"


def _ttl_ms(window: float) -> int:
    return int(window * 2000)
