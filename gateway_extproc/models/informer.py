"""One list + watch loop over one Kubernetes collection, on a thread of its own.

The discovery sources (models/kubernetes.py: labelled pods; models/inferencepool.py: an
InferencePool and its pods) share this loop: list (paged) to get a snapshot and its
resourceVersion, then watch from that version; relist on a 410 Gone (at once the first
time), after an ERROR event, and every `resync_period`; back off with jitter when the
API server fails; never let the thread die.

The `kubernetes` client is blocking, so the loop runs in a thread. The wire protocol (a
JSON list, then newline-delimited watch events on a chunked stream) is read directly,
with `_preload_content=False`, so that a malformed line, a BOOKMARK or an ERROR Status is
handled here rather than inside the client. What an object means is the handler's
business: it gets the listed items and each event's object, on this thread, and hands
them to wherever they belong (a source posts them to its event loop).

`InformerSource` is the sources' common side of that hand-off: posting to the loop from
an informer thread, the closed guard on registry writes, and the synced flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import orjson
import structlog
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from gateway_extproc.models.adapters import AdapterDiscovery
from gateway_extproc.models.registry import ModelRegistry, Pod

log = structlog.get_logger("gateway_extproc.kubernetes")

# A watch event is one JSON object per line; a line this long means the stream is broken.
_MAX_EVENT_LINE = 16 * 1024 * 1024
_WARN_INTERVAL = 30.0
# A watch that ends this soon without delivering anything counts as a failure (backoff),
# so a server that closes watches immediately cannot make us spin.
_MIN_HEALTHY_WATCH = 1.0


@dataclass(frozen=True, slots=True)
class WatchTiming:
    """How often an informer relists, how long its requests may take, how it backs off."""

    resync_period: float = 300.0  # full relist this often; 0 disables
    watch_timeout: float = 240.0  # server-side timeoutSeconds of one watch request
    request_timeout: float = 30.0  # connect and list read timeout
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    list_page_size: int = 500


class Stopped(Exception):
    """The informer is stopping (raised by handlers whose receiver has gone away too)."""


class WatchHandler(Protocol):
    """What an informer tells its owner; both are called on the informer's thread."""

    def listed(self, items: list[dict[str, Any]]) -> None:
        """A complete list: exactly these objects exist now."""

    def changed(self, kind: str, obj: dict[str, Any]) -> None:
        """One ADDED, MODIFIED or DELETED event (the object has a name)."""


# Issues one list or watch request of the collection with the keyword arguments given
# (label_selector, watch, resource_version, ...) and `_preload_content=False`; returns the
# raw urllib3 response.
CollectionCall = Callable[[k8s_client.ApiClient, dict[str, Any]], Any]


def new_api_client(kubeconfig: str | None, context: str | None) -> k8s_client.ApiClient:
    """A client for the cluster: `kubeconfig`, else in-cluster, else $KUBECONFIG."""
    cfg = k8s_client.Configuration()
    if kubeconfig:
        k8s_config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=cfg, persist_config=False
        )
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        k8s_config.load_incluster_config(client_configuration=cfg)
    else:
        # Read $KUBECONFIG now: the client computes its default path at import time.
        path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        k8s_config.load_kube_config(
            config_file=path, context=context, client_configuration=cfg, persist_config=False
        )
    return k8s_client.ApiClient(cfg)


# -- small helpers --------------------------------------------------------------------------


class Backoff:
    """Exponential backoff with equal jitter: half the delay fixed, half random."""

    def __init__(self, base: float, cap: float) -> None:
        self._base = max(base, 0.001)
        self._cap = max(cap, self._base)
        self._attempt = 0

    def next(self) -> float:
        ceiling = min(self._cap, self._base * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 32)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self._attempt = 0


class WarnThrottle:
    """At most one warning per event name per interval; the rest are counted."""

    def __init__(self, interval: float = _WARN_INTERVAL) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        last = self._last.get(event)
        if last is not None and now - last < self._interval:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return
        self._last[event] = now
        log.warning(event, suppressed=self._suppressed.pop(event, 0), **fields)


class _Expired(Exception):
    """The resourceVersion we hold is gone (410): relist."""


class _WatchFailed(Exception):
    """The server ended the watch with an ERROR Status other than 410: relist after backoff."""


# -- the informer ---------------------------------------------------------------------------


@dataclass
class Informer:
    """List + watch of one collection; `start()` runs it on a daemon thread.

    `stop()` ends it promptly from any thread: it cuts the request in flight, and the
    handler is not called again once the thread has noticed (a handler that must not
    be called after `stop()` returns guards itself, as the sources do on their loop).
    """

    name: str  # thread and log name, e.g. "pods/default"
    call: CollectionCall
    handler: WatchHandler
    connect: Callable[[], k8s_client.ApiClient]
    timing: WatchTiming = field(default_factory=WatchTiming)
    label_selector: str = ""
    field_selector: str = ""
    resource_version: str | None = None  # where the next watch starts; None: list first
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # guards _response
    _response: urllib3.BaseHTTPResponse | None = None  # in flight, so stop() can cut it
    _thread: threading.Thread | None = None
    _next_resync: float = 0.0
    _throttle: WarnThrottle = field(default_factory=WarnThrottle)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"k8s-informer-{self.name}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            response = self._response
        if response is not None:
            _cut(response)

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the thread; True when it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.alive

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff(self.timing.backoff_base, self.timing.backoff_max)
        api: k8s_client.ApiClient | None = None
        just_expired = False
        while not self._stopping.is_set():
            delay = 0.0
            try:
                if api is None:
                    api = self.connect()
                if self.resource_version is None or self._resync_due():
                    self._list(api)
                if self._watch(api):
                    backoff.reset()
                    just_expired = False
                else:
                    delay = backoff.next()
            except Stopped:
                break
            except _Expired as exc:
                # One immediate relist; a second 410 in a row waits like any failure.
                self.resource_version = None
                log.info("kubernetes_resource_version_expired", scope=self.name, detail=str(exc))
                delay = backoff.next() if just_expired else 0.0
                just_expired = True
            except _WatchFailed as exc:
                self.resource_version = None
                self._throttle.warn("kubernetes_watch_error", scope=self.name, detail=str(exc))
                delay = backoff.next()
            except ConfigException as exc:
                log.error("kubernetes_config_error", error=str(exc))
                delay = self.timing.backoff_max
            except ApiException as exc:
                if self._stopping.is_set():
                    break
                if exc.status == 410:
                    self.resource_version = None
                    delay = backoff.next() if just_expired else 0.0
                    just_expired = True
                    log.info("kubernetes_resource_version_expired", scope=self.name, http=410)
                else:
                    self._throttle.warn(
                        "kubernetes_api_error",
                        scope=self.name,
                        status=exc.status,
                        reason=exc.reason,
                    )
                    delay = backoff.next()
            except Exception as exc:  # never let the thread die: the registry would freeze
                if self._stopping.is_set():
                    break
                self._throttle.warn(
                    "kubernetes_connection_lost",
                    scope=self.name,
                    error=f"{type(exc).__name__}: {exc}",
                )
                delay = backoff.next()
            if delay > 0:
                self._stopping.wait(delay)
        if api is not None:
            api.close()
        log.debug("kubernetes_informer_stopped", scope=self.name)

    def _resync_due(self) -> bool:
        return self.timing.resync_period > 0 and time.monotonic() >= self._next_resync

    def _request(self, api: k8s_client.ApiClient, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        if self.label_selector:
            kwargs["label_selector"] = self.label_selector
        if self.field_selector:
            kwargs["field_selector"] = self.field_selector
        kwargs["_preload_content"] = False
        # With _preload_content=False the client returns the raw urllib3 response.
        resp = cast(urllib3.BaseHTTPResponse, self.call(api, kwargs))
        with self._lock:
            if self._stopping.is_set():
                _cut(resp)
                raise Stopped
            self._response = resp
        return resp

    def _release(self, resp: urllib3.BaseHTTPResponse, *, clean: bool) -> None:
        with self._lock:
            self._response = None
        if not clean:
            resp.close()  # a half-read connection must not go back to the pool
        resp.release_conn()

    def _list(self, api: k8s_client.ApiClient) -> None:
        timeout = self.timing.request_timeout
        items: list[dict[str, Any]] = []
        token: str | None = None
        resource_version = ""
        while True:
            resp = self._request(
                api,
                limit=self.timing.list_page_size,
                _continue=token,
                _request_timeout=(timeout, timeout),
            )
            clean = False
            try:
                doc = orjson.loads(resp.read())
                clean = True
            finally:
                self._release(resp, clean=clean)
            if not isinstance(doc, dict) or not isinstance(doc.get("items", []), list):
                raise ValueError("list response is not a list of objects")
            items.extend(obj for obj in doc.get("items") or () if isinstance(obj, dict))
            meta = doc.get("metadata") or {}
            resource_version = str(meta.get("resourceVersion") or resource_version)
            token = meta.get("continue") or None
            if not token:
                break
        if not resource_version:
            raise ValueError("list response has no resourceVersion")
        log.debug("kubernetes_listed", scope=self.name, items=len(items), rv=resource_version)
        self._check_stopping()
        self.handler.listed(items)
        self.resource_version = resource_version
        self._next_resync = time.monotonic() + self.timing.resync_period

    def _watch(self, api: k8s_client.ApiClient) -> bool:
        """One watch request from self.resource_version; True if it was healthy."""
        timing = self.timing
        seconds = timing.watch_timeout
        if timing.resync_period > 0:
            seconds = min(seconds, self._next_resync - time.monotonic())
        seconds_int = max(1, int(seconds))
        resp = self._request(
            api,
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=seconds_int,
            # The read timeout only catches a silent dead peer; the server ends the
            # stream itself after timeout_seconds.
            _request_timeout=(timing.request_timeout, seconds_int + timing.request_timeout),
        )
        started = time.monotonic()
        events = 0
        clean = False
        try:
            pending = bytearray()
            for chunk in _body_chunks(resp):
                pending += chunk
                while (newline := pending.find(b"\n")) >= 0:
                    line = bytes(pending[:newline])
                    del pending[: newline + 1]
                    events += self._handle_line(line)
                if len(pending) > _MAX_EVENT_LINE:
                    raise ValueError("watch event line too long")
            events += self._handle_line(bytes(pending))
            clean = True
        finally:
            self._release(resp, clean=clean)
        return events > 0 or time.monotonic() - started >= _MIN_HEALTHY_WATCH

    def _handle_line(self, line: bytes) -> int:
        """Apply one watch event line; returns 1 if it was a well-formed event."""
        if not line.strip():
            return 0
        try:
            event = orjson.loads(line)
            kind = event["type"]
            obj = event["object"]
            if not isinstance(kind, str) or not isinstance(obj, dict):
                raise TypeError("type or object has the wrong shape")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            # Skip it: the resourceVersion only moves on good events, so nothing is lost
            # that a later relist would not repair.
            self._throttle.warn(
                "kubernetes_bad_watch_event", scope=self.name, error=str(exc), line=line[:200]
            )
            return 0
        meta = obj.get("metadata") or {}
        rv = meta.get("resourceVersion")
        name = meta.get("name")
        log.debug("kubernetes_watch_event", scope=self.name, type=kind, name=name, rv=rv)
        if kind == "ERROR":
            code = obj.get("code")
            detail = f"{code} {obj.get('reason')}: {obj.get('message')}"
            if code == 410:
                raise _Expired(detail)
            raise _WatchFailed(detail)
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = str(rv)
            return 1
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            self._throttle.warn("kubernetes_unknown_watch_event", scope=self.name, type=kind)
            return 0
        if not name:
            self._throttle.warn("kubernetes_bad_watch_event", scope=self.name, error="no name")
            return 0
        self._check_stopping()
        # Advance before handing over, so that whoever sees the change sees its version.
        if rv:
            self.resource_version = str(rv)
        self.handler.changed(kind, obj)
        return 1

    def _check_stopping(self) -> None:
        if self._stopping.is_set():
            raise Stopped


# -- the sources' side -----------------------------------------------------------------------


class InformerSource:
    """What both Kubernetes sources share: their informers' handlers post what they read
    to the event loop (`_post`), where every registry write happens and none once
    `_closed` is set; `synced` once the first lists have been applied; LoRA adapters
    found by polling, when on, decorate each pod written."""

    def __init__(self, registry: ModelRegistry, loop: asyncio.AbstractEventLoop | None) -> None:
        self._registry = registry
        self._loop = loop  # None: the source takes the running loop in start()
        self._adapters: AdapterDiscovery | None = None
        # Loop-thread state.
        self._closed = False
        self._synced = asyncio.Event()

    @property
    def synced(self) -> bool:
        """True once the first lists have been applied to the registry."""
        return self._synced.is_set()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _post(self, fn: Any, *args: Any) -> None:
        """From an informer thread: call `fn(*args)` on the loop; Stopped once closed."""
        if self._closed or self._loop is None:
            raise Stopped
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError as exc:  # the loop is closed: nobody left to inform
            raise Stopped from exc

    def _decorate(self, pod: Pod) -> Pod:
        return self._adapters.decorate(pod) if self._adapters is not None else pod


def object_key(obj: dict[str, Any]) -> str:
    """`namespace/name` of an API object (`name` for a cluster-scoped one)."""
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or ""
    name = meta.get("name") or ""
    return f"{namespace}/{name}" if namespace else name


def _body_chunks(resp: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """Yield the body as it arrives (a watch never ends on its own, so never read to EOF)."""
    if resp.chunked:
        yield from resp.stream(None)
        return
    while chunk := resp.read1(64 * 1024):
        yield chunk


def _cut(resp: urllib3.BaseHTTPResponse) -> None:
    """Wake a thread blocked reading `resp` (called from another thread)."""
    try:
        resp.shutdown()
    except Exception:  # already released or closed: nothing is blocked on it
        with contextlib.suppress(Exception):
            resp.close()
