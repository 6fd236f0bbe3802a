"""Kubernetes informer source: keeps the ModelRegistry equal to the cluster's model pods.

This module owns the list + watch loop against the API server (one per watched namespace,
or one cluster-wide), the mapping from a Pod object to a registry `Pod`, periodic resync,
410 Gone handling, reconnect backoff with jitter, and the hand-over of every change to the
event loop.

The `kubernetes` client is blocking, so it runs only in this module's threads; every
registry write is handed to the loop with `loop.call_soon_threadsafe` and happens there.
The wire protocol (a JSON PodList, then newline-delimited watch events on a chunked
stream) is read directly, with `_preload_content=False`, so that a malformed line, a
BOOKMARK or an ERROR Status is handled here rather than inside the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

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

DEFAULT_MODEL_LABEL = "model.aibrix.ai/name"
DEFAULT_PORT_LABEL = "model.aibrix.ai/port"
DEFAULT_METRIC_PORT_LABEL = "model.aibrix.ai/metric-port"
# Pod annotations overriding where the engine publishes KV-cache events: a port (on the
# pod IP), a full `tcp://host:port`, or `off`.
KV_EVENTS_ANNOTATION = "gateway-extproc.io/kv-events"
KV_EVENTS_REPLAY_ANNOTATION = "gateway-extproc.io/kv-events-replay"

# A watch event is one JSON object per line; a line this long means the stream is broken.
_MAX_EVENT_LINE = 16 * 1024 * 1024
# Bound on the remembered (pod, label, value) triples already warned about.
_MAX_WARNED = 10_000
_WARN_INTERVAL = 30.0
# A watch that ends this soon without delivering anything counts as a failure (backoff),
# so a server that closes watches immediately cannot make us spin.
_MIN_HEALTHY_WATCH = 1.0


@dataclass(frozen=True, slots=True)
class KubernetesOptions:
    """How the informer finds the cluster and reads model pods from it."""

    kubeconfig: str | None = None  # None: in-cluster config, else $KUBECONFIG / ~/.kube/config
    context: str | None = None  # kubeconfig context; None uses the current context
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    model_label: str = DEFAULT_MODEL_LABEL
    port_label: str = DEFAULT_PORT_LABEL
    metric_port_label: str = DEFAULT_METRIC_PORT_LABEL
    default_port: int = 8000
    resync_period: float = 300.0  # full relist this often; 0 disables
    watch_timeout: float = 240.0  # server-side timeoutSeconds of one watch request
    request_timeout: float = 30.0  # connect and list read timeout
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    list_page_size: int = 500
    adapter_discovery_interval: float = 0.0  # poll /v1/models for LoRA adapters; 0: off
    adapter_request_timeout: float = 2.0
    kv_events_port: int = 0  # KV-cache events on the pod IP at this port; 0: none

    def __post_init__(self) -> None:
        # A bad value is a start-up error, not a thread that retries forever.
        if not self.model_label:
            raise ValueError("model_label must not be empty")
        if not 0 < self.default_port < 65536:
            raise ValueError(f"default_port {self.default_port} is not a TCP port")
        if self.resync_period < 0 or self.adapter_discovery_interval < 0:
            raise ValueError("resync_period and adapter_discovery_interval must be >= 0")
        positive = ("watch_timeout", "request_timeout", "backoff_base", "backoff_max")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.list_page_size <= 0 or self.adapter_request_timeout <= 0:
            raise ValueError("list_page_size and adapter_request_timeout must be positive")
        if isinstance(self.namespaces, str):
            raise TypeError("namespaces is a tuple of names, not a string")


# -- mapping ------------------------------------------------------------------------------


class PodMapper:
    """Turns a Pod object (the API's JSON) into a registry `Pod`.

    Returns None for objects that serve no model (no or empty model label). A bad port
    label is warned about once per (pod, label, value) and replaced by its default.
    """

    def __init__(self, options: KubernetesOptions) -> None:
        self._options = options
        self._warned: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def __call__(self, obj: Any) -> Pod | None:
        if not isinstance(obj, Mapping):
            return None
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        labels = meta.get("labels") or {}
        model = labels.get(self._options.model_label)
        name = meta.get("name")
        if not model or not isinstance(model, str) or not name:
            return None
        namespace = meta.get("namespace") or ""
        key = f"{namespace}/{name}" if namespace else name
        port = self._port(labels, self._options.port_label, self._options.default_port, key)
        metric_port = self._port(labels, self._options.metric_port_label, port, key)
        ip = status.get("podIP") or ""
        phase = status.get("phase") or ""
        annotations = meta.get("annotations") or {}
        kv_events = self._kv_endpoint(
            annotations, KV_EVENTS_ANNOTATION, self._options.kv_events_port, ip, key
        )
        replay = self._kv_endpoint(annotations, KV_EVENTS_REPLAY_ANNOTATION, 0, ip, key)
        return Pod(
            name=name,
            namespace=namespace,
            address=_join_host_port(ip, port) if ip else "",
            metrics_address=_join_host_port(ip, metric_port) if ip else "",
            models=(model,),
            ready=phase == "Running" and _condition_true(status, "Ready"),
            terminating=bool(meta.get("deletionTimestamp")),
            kv_events=kv_events,
            kv_events_replay=replay if kv_events else "",
        )

    def _kv_endpoint(
        self, annotations: Mapping[str, Any], name: str, default_port: int, ip: str, key: str
    ) -> str:
        raw = annotations.get(name) if isinstance(annotations, Mapping) else None
        port = default_port
        if isinstance(raw, str) and raw.strip():
            value = raw.strip()
            if value.lower() == "off":
                return ""
            if value.startswith("tcp://"):
                return value
            if value.isdigit() and 0 < int(value) < 65536:
                port = int(value)
            else:
                self._warn_once(key, name, value, port or "no KV-cache events")
        if not ip or not port:
            return ""
        return f"tcp://{_join_host_port(ip, port)}"

    def _port(self, labels: Mapping[str, Any], label: str, default: int, key: str) -> int:
        raw = labels.get(label)
        if raw is None:
            return default
        try:
            value = int(str(raw), 10)
        except ValueError:
            value = 0
        if 0 < value < 65536:
            return value
        self._warn_once(key, label, str(raw), default)
        return default

    def _warn_once(self, key: str, label: str, raw: str, using: object) -> None:
        seen = (key, label, raw)
        with self._lock:
            if seen in self._warned:
                return
            if len(self._warned) >= _MAX_WARNED:
                self._warned.clear()
            self._warned.add(seen)
        log.warning("kubernetes_bad_port_label", pod=key, label=label, value=raw, using=using)


def _condition_true(status: Mapping[str, Any], kind: str) -> bool:
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == kind:
            return cond.get("status") == "True"
    return False


def _join_host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# -- small helpers --------------------------------------------------------------------------


class _Backoff:
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


class _WarnThrottle:
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


class _Stopped(Exception):
    """stop() was called while a request was being set up."""


@dataclass
class _Scope:
    """One list + watch loop: a namespace, or "" for the whole cluster."""

    namespace: str
    resource_version: str | None = None  # None: must list before watching
    next_resync: float = 0.0
    response: urllib3.BaseHTTPResponse | None = None  # in flight, so stop() can cut it
    throttle: _WarnThrottle = field(default_factory=_WarnThrottle)

    @property
    def label(self) -> str:
        return self.namespace or "*"


# -- the source ---------------------------------------------------------------------------


class KubernetesSource:
    """Keeps `registry` equal to the model pods the API server reports.

    A DiscoverySource (models/source.py): `start()` runs one thread per scope; `stop()`
    ends them promptly, guarantees no registry write after it returns and waits (up to
    its timeout) for the threads to exit; `running` says whether one is still alive.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        loop: asyncio.AbstractEventLoop,
        options: KubernetesOptions | None = None,
    ) -> None:
        self._registry = registry
        self._loop = loop
        self._options = options or KubernetesOptions()
        self._mapper = PodMapper(self._options)
        namespaces = tuple(dict.fromkeys(self._options.namespaces))  # dedupe, keep order
        self._scopes = [_Scope(ns) for ns in namespaces] or [_Scope("")]
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # guards _Scope.response against stop()
        self._adapters: AdapterDiscovery | None = None
        # Loop-thread state: the pods each scope reported, undecorated by adapters.
        self._closed = False
        self._known: dict[str, Pod] = {}
        self._keys_by_scope: dict[str, set[str]] = {s.namespace: set() for s in self._scopes}
        self._listed: set[str] = set()
        self._synced = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._threads:
            return
        if self._options.adapter_discovery_interval > 0:
            self._adapters = AdapterDiscovery(
                self._registry,
                interval=self._options.adapter_discovery_interval,
                timeout=self._options.adapter_request_timeout,
            )
            self._loop.call_soon_threadsafe(self._adapters.start)
        for scope in self._scopes:
            thread = threading.Thread(
                target=self._run, args=(scope,), name=f"k8s-informer-{scope.label}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        log.info(
            "kubernetes_source_started",
            namespaces=[s.label for s in self._scopes],
            model_label=self._options.model_label,
        )

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the informer threads and wait up to `timeout` seconds for them to exit.

        No registry write happens after this returns (the write guard is checked on the
        loop thread, where this runs).
        """
        self._close()
        await self._wait_closed(timeout)

    @property
    def running(self) -> bool:
        """True while an informer thread is alive (after `stop`: it did not exit in time)."""
        return any(t.is_alive() for t in self._threads)

    def _close(self) -> None:
        self._closed = True
        with self._lock:
            self._stopping.set()
            responses = [s.response for s in self._scopes if s.response is not None]
        for resp in responses:
            _cut(resp)
        if self._adapters is not None:
            self._adapters.stop()

    async def _wait_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.to_thread(thread.join, remaining)
        if self._adapters is not None:
            await self._adapters.wait_closed()

    @property
    def synced(self) -> bool:
        """True once the first list of every scope has been applied to the registry."""
        return self._synced.is_set()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def resource_version(self, namespace: str = "") -> str | None:
        """The resourceVersion the next watch of `namespace` ("" = cluster-wide) starts from."""
        for scope in self._scopes:
            if scope.namespace == namespace:
                return scope.resource_version
        return None

    # -- the informer thread --------------------------------------------------------------

    def _run(self, scope: _Scope) -> None:
        backoff = _Backoff(self._options.backoff_base, self._options.backoff_max)
        api: k8s_client.ApiClient | None = None
        just_expired = False
        while not self._stopping.is_set():
            delay = 0.0
            try:
                if api is None:
                    api = self._new_api_client()
                core = k8s_client.CoreV1Api(api)
                if scope.resource_version is None or self._resync_due(scope):
                    self._list(core, scope)
                if self._watch(core, scope):
                    backoff.reset()
                    just_expired = False
                else:
                    delay = backoff.next()
            except _Stopped:
                break
            except _Expired as exc:
                # One immediate relist; a second 410 in a row waits like any failure.
                scope.resource_version = None
                log.info("kubernetes_resource_version_expired", scope=scope.label, detail=str(exc))
                delay = backoff.next() if just_expired else 0.0
                just_expired = True
            except _WatchFailed as exc:
                scope.resource_version = None
                scope.throttle.warn("kubernetes_watch_error", scope=scope.label, detail=str(exc))
                delay = backoff.next()
            except ConfigException as exc:
                log.error("kubernetes_config_error", error=str(exc))
                delay = self._options.backoff_max
            except ApiException as exc:
                if self._stopping.is_set():
                    break
                if exc.status == 410:
                    scope.resource_version = None
                    delay = backoff.next() if just_expired else 0.0
                    just_expired = True
                    log.info("kubernetes_resource_version_expired", scope=scope.label, http=410)
                else:
                    scope.throttle.warn(
                        "kubernetes_api_error",
                        scope=scope.label,
                        status=exc.status,
                        reason=exc.reason,
                    )
                    delay = backoff.next()
            except Exception as exc:  # never let the thread die: the registry would freeze
                if self._stopping.is_set():
                    break
                scope.throttle.warn(
                    "kubernetes_connection_lost",
                    scope=scope.label,
                    error=f"{type(exc).__name__}: {exc}",
                )
                delay = backoff.next()
            if delay > 0:
                self._stopping.wait(delay)
        if api is not None:
            api.close()
        log.debug("kubernetes_informer_stopped", scope=scope.label)

    def _new_api_client(self) -> k8s_client.ApiClient:
        opts = self._options
        cfg = k8s_client.Configuration()
        if opts.kubeconfig:
            k8s_config.load_kube_config(
                config_file=opts.kubeconfig,
                context=opts.context,
                client_configuration=cfg,
                persist_config=False,
            )
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=cfg)
        else:
            # Read $KUBECONFIG now: the client computes its default path at import time.
            path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            k8s_config.load_kube_config(
                config_file=path,
                context=opts.context,
                client_configuration=cfg,
                persist_config=False,
            )
        return k8s_client.ApiClient(cfg)

    def _resync_due(self, scope: _Scope) -> bool:
        return self._options.resync_period > 0 and time.monotonic() >= scope.next_resync

    def _request(
        self, core: k8s_client.CoreV1Api, scope: _Scope, **kwargs: Any
    ) -> urllib3.BaseHTTPResponse:
        kwargs.update(label_selector=self._options.model_label, _preload_content=False)
        # With _preload_content=False the client returns the raw urllib3 response.
        if scope.namespace:
            raw: Any = core.list_namespaced_pod(scope.namespace, **kwargs)
        else:
            raw = core.list_pod_for_all_namespaces(**kwargs)
        resp = cast(urllib3.BaseHTTPResponse, raw)
        with self._lock:
            if self._stopping.is_set():
                _cut(resp)
                raise _Stopped
            scope.response = resp
        return resp

    def _release(self, scope: _Scope, resp: urllib3.BaseHTTPResponse, *, clean: bool) -> None:
        with self._lock:
            scope.response = None
        if not clean:
            resp.close()  # a half-read connection must not go back to the pool
        resp.release_conn()

    def _list(self, core: k8s_client.CoreV1Api, scope: _Scope) -> None:
        timeout = self._options.request_timeout
        pods: list[Pod] = []
        token: str | None = None
        resource_version = ""
        while True:
            resp = self._request(
                core,
                scope,
                limit=self._options.list_page_size,
                _continue=token,
                _request_timeout=(timeout, timeout),
            )
            clean = False
            try:
                doc = orjson.loads(resp.read())
                clean = True
            finally:
                self._release(scope, resp, clean=clean)
            if not isinstance(doc, dict) or not isinstance(doc.get("items", []), list):
                raise ValueError("list response is not a PodList")
            for obj in doc.get("items") or ():
                pod = self._mapper(obj)
                if pod is not None:
                    pods.append(pod)
            meta = doc.get("metadata") or {}
            resource_version = str(meta.get("resourceVersion") or resource_version)
            token = meta.get("continue") or None
            if not token:
                break
        if not resource_version:
            raise ValueError("list response has no resourceVersion")
        scope.resource_version = resource_version
        scope.next_resync = time.monotonic() + self._options.resync_period
        log.debug(
            "kubernetes_pods_listed",
            scope=scope.label,
            pods=len(pods),
            resource_version=resource_version,
        )
        self._post(self._apply_list, scope.namespace, pods)

    def _watch(self, core: k8s_client.CoreV1Api, scope: _Scope) -> bool:
        """One watch request from scope.resource_version; True if it was healthy."""
        opts = self._options
        seconds = opts.watch_timeout
        if opts.resync_period > 0:
            seconds = min(seconds, scope.next_resync - time.monotonic())
        seconds_int = max(1, int(seconds))
        resp = self._request(
            core,
            scope,
            watch=True,
            resource_version=scope.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=seconds_int,
            # The read timeout only catches a silent dead peer; the server ends the
            # stream itself after timeout_seconds.
            _request_timeout=(opts.request_timeout, seconds_int + opts.request_timeout),
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
                    events += self._handle_line(scope, line)
                if len(pending) > _MAX_EVENT_LINE:
                    raise ValueError("watch event line too long")
            events += self._handle_line(scope, bytes(pending))
            clean = True
        finally:
            self._release(scope, resp, clean=clean)
        return events > 0 or time.monotonic() - started >= _MIN_HEALTHY_WATCH

    def _handle_line(self, scope: _Scope, line: bytes) -> int:
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
            scope.throttle.warn(
                "kubernetes_bad_watch_event", scope=scope.label, error=str(exc), line=line[:200]
            )
            return 0
        meta = obj.get("metadata") or {}
        rv = meta.get("resourceVersion")
        log.debug(
            "kubernetes_watch_event", scope=scope.label, type=kind, name=meta.get("name"), rv=rv
        )
        if kind == "ERROR":
            code = obj.get("code")
            detail = f"{code} {obj.get('reason')}: {obj.get('message')}"
            if code == 410:
                raise _Expired(detail)
            raise _WatchFailed(detail)
        if kind == "BOOKMARK":
            if rv:
                scope.resource_version = str(rv)
            return 1
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            scope.throttle.warn("kubernetes_unknown_watch_event", scope=scope.label, type=kind)
            return 0
        name = meta.get("name")
        if not name:
            scope.throttle.warn("kubernetes_bad_watch_event", scope=scope.label, error="no name")
            return 0
        namespace = meta.get("namespace") or ""
        key = f"{namespace}/{name}" if namespace else name
        pod = None if kind == "DELETED" else self._mapper(obj)
        # Advance before handing over, so that whoever sees the change sees its version.
        if rv:
            scope.resource_version = str(rv)
        if pod is None:
            # Deleted, or relabelled so that it no longer serves a model.
            self._post(self._apply_delete, scope.namespace, key)
        else:
            self._post(self._apply_upsert, scope.namespace, pod)
        return 1

    def _post(self, fn: Any, *args: Any) -> None:
        if self._stopping.is_set():
            raise _Stopped
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError as exc:  # the loop is closed: nobody left to inform
            self._stopping.set()
            raise _Stopped from exc

    # -- the loop thread ------------------------------------------------------------------

    def _decorate(self, pod: Pod) -> Pod:
        return self._adapters.decorate(pod) if self._adapters is not None else pod

    def _apply_list(self, namespace: str, pods: list[Pod]) -> None:
        if self._closed:
            return
        keys = {p.key for p in pods}
        gone = self._keys_by_scope[namespace] - keys
        for key in gone:
            self._known.pop(key, None)
        for pod in pods:
            self._known[pod.key] = pod
        self._keys_by_scope[namespace] = keys
        self._listed.add(namespace)
        if len(self._listed) == len(self._keys_by_scope):
            # Every scope has listed: the union of what they reported is the whole truth.
            self._registry.replace_all([self._decorate(p) for p in self._known.values()])
            if not self._synced.is_set():
                self._synced.set()
                log.info("kubernetes_synced", pods=len(self._known))
        else:
            for key in gone:
                self._registry.delete_pod(key)
            for pod in pods:
                self._registry.upsert_pod(self._decorate(pod))

    def _apply_upsert(self, namespace: str, pod: Pod) -> None:
        if self._closed:
            return
        self._known[pod.key] = pod
        self._keys_by_scope[namespace].add(pod.key)
        self._registry.upsert_pod(self._decorate(pod))

    def _apply_delete(self, namespace: str, key: str) -> None:
        if self._closed:
            return
        self._known.pop(key, None)
        self._keys_by_scope[namespace].discard(key)
        self._registry.delete_pod(key)


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
