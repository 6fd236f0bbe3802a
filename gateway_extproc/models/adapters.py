"""LoRA adapter discovery: which adapters each model-server pod serves.

An engine lists its base model and its loaded LoRA adapters at `GET /v1/models`; an
adapter is an entry whose `parent` (or, without one, `root`) is the pod's base model and
differs from its own id. This module owns a poller that asks every routable pod, keeps the
last list each pod answered (a failed poll keeps it), and re-upserts the pod with
`models=(base, *adapters)`. A discovery source passes each pod it writes through
`decorate` so that its own updates keep the adapters the poller found.

Everything here runs on the event loop: the poller is a task, the registry is written
directly.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from typing import Any

import aiohttp
import structlog

from gateway_extproc.models.registry import ModelRegistry, Pod

log = structlog.get_logger("gateway_extproc.kubernetes")

_CONCURRENCY = 16


def adapters_in(listing: Any, base: str) -> tuple[str, ...]:
    """The adapter ids of base model `base` in a `/v1/models` response body."""
    found: list[str] = []
    entries = listing.get("data") if isinstance(listing, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict):
            continue
        ident = entry.get("id")
        origin = entry.get("parent") or entry.get("root")
        if not isinstance(ident, str) or not ident or ident in found:
            continue
        if origin != ident and origin == base:
            found.append(ident)
    return tuple(found)


class AdapterDiscovery:
    """Polls routable pods' `/v1/models` every `interval` seconds and adds their adapters."""

    def __init__(self, registry: ModelRegistry, *, interval: float, timeout: float = 2.0) -> None:
        self._registry = registry
        self._interval = interval
        self._timeout = timeout
        # pod key -> (address the list came from, adapters); the address guards against a
        # pod name reused by a new pod (StatefulSets) inheriting an old list.
        self._adapters: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        registry.on_pod_removed(self._forget)

    def decorate(self, pod: Pod) -> Pod:
        """`pod` with the adapters last seen on it appended to its models."""
        known = self._adapters.get(pod.key)
        if known is None or known[0] != pod.address or not pod.models:
            return pod
        extra = tuple(a for a in known[1] if a not in pod.models)
        return replace(pod, models=pod.models + extra) if extra else pod

    def start(self) -> None:
        """Start polling; call on the loop thread."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    def stop(self) -> None:
        """Stop polling; safe from any thread."""
        self._closed = True
        task = self._task
        if task is not None:
            task.get_loop().call_soon_threadsafe(task.cancel)

    async def wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def poll_once(self) -> None:
        """Ask every routable pod once and apply what changed."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
        gate = asyncio.Semaphore(_CONCURRENCY)
        pods = [p for p in self._registry.pods() if p.routable and p.models]
        await asyncio.gather(*(self._poll_pod(p, gate) for p in pods))

    async def _poll_forever(self) -> None:
        while not self._closed:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the poller must outlive any one bad round
                log.warning("adapter_poll_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self._interval)

    async def _poll_pod(self, pod: Pod, gate: asyncio.Semaphore) -> None:
        assert self._session is not None
        base = pod.models[0]
        try:
            async with gate, self._session.get(f"http://{pod.address}/v1/models") as resp:
                resp.raise_for_status()
                listing = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("adapter_poll_pod_failed", pod=pod.key, error=f"{type(exc).__name__}: {exc}")
            return
        if self._closed:
            return
        adapters = adapters_in(listing, base)
        self._adapters[pod.key] = (pod.address, adapters)
        current = self._registry.pod(pod.key)
        if current is None or current.address != pod.address or not current.models:
            return
        wanted = (current.models[0], *adapters)
        if current.models != wanted:
            log.debug("adapters_changed", pod=pod.key, model=base, adapters=list(adapters))
            self._registry.upsert_pod(replace(current, models=wanted))

    def _forget(self, pod: Pod) -> None:
        self._adapters.pop(pod.key, None)
