"""What engines say they serve at `GET /v1/models`: LoRA adapters of labelled pods, and
the models of pods that carry no model label.

An engine lists its base model and its loaded LoRA adapters at `GET /v1/models`; an
adapter is an entry whose `parent` (or, without one, `root`) is the pod's base model and
differs from its own id. This module owns a poller that asks every routable pod, keeps the
last list each pod answered (a failed poll keeps it), and re-upserts the pod with
`models=(base, *adapters)`. A discovery source passes each pod it writes through
`decorate` so that its own updates keep the adapters the poller found.

`ModelProbe` asks an endpoint whose pod has no model label (InferencePool discovery) which
models it serves, retrying until it answers, and remembers the answer per address.

Everything here runs on the event loop: the poller is a task, the registry is written
directly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
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


def served_models(listing: Any) -> tuple[str, ...]:
    """Every model a `/v1/models` body lists: base models first, then their adapters."""
    entries = listing.get("data") if isinstance(listing, dict) else None
    entries = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    bases: list[str] = []
    for entry in entries:
        ident, parent = entry.get("id"), entry.get("parent")
        if isinstance(ident, str) and ident and parent in (None, ident) and ident not in bases:
            bases.append(ident)
    adapters = [a for base in bases for a in adapters_in(listing, base) if a not in bases]
    return (*bases, *dict.fromkeys(adapters))


class ModelProbe:
    """Asks endpoints which models they serve, once each, until they answer.

    `want(address)` starts asking (every `retry` seconds until the engine answers with at
    least one model); `models(address)` is the answer, None before it; `keep_only` drops
    the addresses no longer in use (a new pod may get the IP later). `on_found(address)`
    is called on the loop when an answer arrives.
    """

    def __init__(
        self, on_found: Callable[[str], None], *, retry: float = 2.0, timeout: float = 2.0
    ) -> None:
        self._on_found = on_found
        self._retry = retry
        self._timeout = timeout
        self._known: dict[str, tuple[str, ...]] = {}
        self._asking: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def models(self, address: str) -> tuple[str, ...] | None:
        return self._known.get(address)

    def want(self, address: str) -> None:
        """Start asking `address`; call on the loop thread."""
        if self._closed or address in self._known or address in self._asking:
            return
        task = asyncio.get_running_loop().create_task(self._ask(address))
        self._asking[address] = task
        # Only this task's own entry: a later want() of the address may have replaced it.
        task.add_done_callback(
            lambda done: self._asking.pop(address) if self._asking.get(address) is done else None
        )

    def keep_only(self, addresses: Iterable[str]) -> None:
        keep = set(addresses)
        for address in [a for a in self._known if a not in keep]:
            del self._known[address]
        for address in [a for a in self._asking if a not in keep]:
            self._asking.pop(address).cancel()

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._asking.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _ask(self, address: str) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
        while not self._closed:
            try:
                async with self._session.get(f"http://{address}/v1/models") as resp:
                    resp.raise_for_status()
                    models = served_models(await resp.json(content_type=None))
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.debug("model_probe_failed", address=address, error=f"{type(exc).__name__}")
                models = ()
            if models:
                self._known[address] = models
                log.info("model_probe_answered", address=address, models=list(models))
                self._on_found(address)
                return
            await asyncio.sleep(self._retry)


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
