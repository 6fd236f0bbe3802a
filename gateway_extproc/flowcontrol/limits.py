"""Per-tenant rate limits: requests and tokens per window, per fairness id.

Windows are fixed and aligned to the wall clock (window n covers [n*W, (n+1)*W) seconds
since the epoch), so that replicas sharing a Redis count into the same window without
talking to each other. A request is refused when its tenant has used its requests or
its tokens for the window; it counts one request when let through, and its tokens (from
the response's usage) when it ends. A window can so end a little over its token limit:
by the tokens of the requests already running when the limit was reached.

Counting is in this process by default (`LocalWindows`); with `--redis-url` it is shared
(flowcontrol/redis_limits.py). If the shared store fails, requests are let through (a
rate limit must not take inference down with it), counted and warned about.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from gateway_extproc import errors, telemetry
from gateway_extproc.flowcontrol.config import FlowConfig, TenantLimits

log = structlog.get_logger("gateway_extproc.flowcontrol")

_WARN_EVERY_S = 60.0
# Tenants that no limit names share this label in metrics (clients choose ids freely).
OTHER_TENANT_LABEL = "other"


@dataclass(frozen=True, slots=True)
class WindowUse:
    """What a tenant has used of the current window, as seen by one check."""

    allowed: bool
    requests: int  # counted so far, this request included when allowed
    tokens: int


class SharedWindows(Protocol):
    """Window counts kept outside the process, shared by every replica."""

    async def take(
        self, tenant: str, index: int, window: float, limits: TenantLimits
    ) -> WindowUse: ...

    async def add_tokens(self, tenant: str, index: int, window: float, tokens: int) -> None: ...

    async def close(self) -> None: ...


class LocalWindows:
    """The current window's counts, in this process. Only the current window is kept:
    tenant ids come from clients, so old ones must not pile up."""

    def __init__(self) -> None:
        self._index = -1
        self._counts: dict[str, list[int]] = {}  # tenant -> [requests, tokens]

    def take(self, tenant: str, index: int, limits: TenantLimits) -> WindowUse:
        counts = self._current(index).setdefault(tenant, [0, 0])
        requests, tokens = counts
        if (limits.requests and requests >= limits.requests) or (
            limits.tokens and tokens >= limits.tokens
        ):
            return WindowUse(False, requests, tokens)
        counts[0] += 1
        return WindowUse(True, counts[0], tokens)

    def add_tokens(self, tenant: str, index: int, tokens: int) -> None:
        counts = self._current(index).setdefault(tenant, [0, 0])
        counts[1] += tokens

    def _current(self, index: int) -> dict[str, list[int]]:
        if index != self._index:
            if index < self._index:
                return {}  # a clock step backwards: count into nothing kept
            self._index = index
            self._counts = {}
        return self._counts


class RateLimiter:
    def __init__(
        self,
        config: FlowConfig,
        shared: SharedWindows | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._window = config.window_seconds
        self._local = LocalWindows()
        self._shared = shared
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_at = float("-inf")

    @property
    def enabled(self) -> bool:
        return self._config.has_limits

    @property
    def shared(self) -> bool:
        return self._shared is not None and self.enabled

    def tenant_label(self, tenant: str) -> str:
        return tenant if tenant in self._config.tenant_limits else OTHER_TENANT_LABEL

    def check(self, tenant: str) -> None:
        """Count one request for `tenant` in this process; its 429 if over a limit."""
        limits = self._config.limits_for(tenant)
        if not limits.any:
            return
        now = self._clock()
        index = int(now // self._window)
        self._verdict(tenant, limits, self._local.take(tenant, index, limits), index, now)

    async def check_shared(self, tenant: str) -> None:
        """`check`, counted in the shared store (let through if the store fails)."""
        assert self._shared is not None
        limits = self._config.limits_for(tenant)
        if not limits.any:
            return
        now = self._clock()
        index = int(now // self._window)
        try:
            use = await self._shared.take(tenant, index, self._window, limits)
        except Exception as exc:  # any failure of the store: let the request through
            self._store_failed("take", exc)
            return
        self._verdict(tenant, limits, use, index, self._clock())

    def record_tokens(self, tenant: str, tokens: int) -> None:
        """Count `tokens` used by a finished request of `tenant`."""
        if tokens <= 0 or not self._config.limits_for(tenant).tokens:
            return
        index = int(self._clock() // self._window)
        if self._shared is None:
            self._local.add_tokens(tenant, index, tokens)
            return
        task = asyncio.get_running_loop().create_task(self._add_shared(tenant, index, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._shared is not None:
            await self._shared.close()

    async def _add_shared(self, tenant: str, index: int, tokens: int) -> None:
        assert self._shared is not None
        try:
            await self._shared.add_tokens(tenant, index, self._window, tokens)
        except Exception as exc:
            self._store_failed("add_tokens", exc)

    def _verdict(
        self, tenant: str, limits: TenantLimits, use: WindowUse, index: int, now: float
    ) -> None:
        if use.allowed:
            return
        reset = max((index + 1) * self._window - now, 0.0)
        headers: list[tuple[str, str]] = []
        for kind, limit, used in (
            ("requests", limits.requests, use.requests),
            ("tokens", limits.tokens, use.tokens),
        ):
            if limit:
                headers += [
                    (f"x-ratelimit-limit-{kind}", str(limit)),
                    (f"x-ratelimit-remaining-{kind}", str(max(limit - used, 0))),
                    (f"x-ratelimit-reset-{kind}", duration_text(reset)),
                ]
        kind = "requests" if limits.requests and use.requests >= limits.requests else "tokens"
        limit = limits.requests if kind == "requests" else limits.tokens
        raise errors.rate_limit_exceeded(
            kind, tenant, limit, self._window, max(math.ceil(reset), 1), tuple(headers)
        )

    def _store_failed(self, what: str, exc: Exception) -> None:
        telemetry.RATE_LIMIT_STORE_ERRORS.inc()
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "rate_limit_store_failed",
                operation=what,
                problem=repr(exc),
                hint="requests are let through uncounted until the store answers again",
            )


def duration_text(seconds: float) -> str:
    """A reset time as OpenAI writes it: `250ms`, `12s`, `6m0s`."""
    if seconds < 1:
        return f"{max(round(seconds * 1000), 1)}ms"
    whole = math.ceil(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s"
