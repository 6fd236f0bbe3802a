"""Kubernetes informer source: keeps the ModelRegistry equal to the cluster's model pods.

This module owns the mapping from a labelled Pod object to a registry `Pod` and the
source that runs one list + watch loop (models/informer.py) per watched namespace, or one
cluster-wide, and applies what they report to the registry.

The informers run in threads; every registry write is handed to the loop with
`loop.call_soon_threadsafe` and happens there.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from kubernetes import client as k8s_client

from gateway_extproc.models.adapters import AdapterDiscovery
from gateway_extproc.models.informer import (
    Informer,
    InformerSource,
    WatchTiming,
    new_api_client,
    object_key,
)
from gateway_extproc.models.registry import ModelRegistry, Pod

log = structlog.get_logger("gateway_extproc.kubernetes")

DEFAULT_MODEL_LABEL = "model.aibrix.ai/name"
DEFAULT_PORT_LABEL = "model.aibrix.ai/port"
DEFAULT_METRIC_PORT_LABEL = "model.aibrix.ai/metric-port"
# Pod annotations overriding where the engine publishes KV-cache events: a port (on the
# pod IP), a full `tcp://host:port`, or `off`.
KV_EVENTS_ANNOTATION = "gateway-extproc.io/kv-events"
KV_EVENTS_REPLAY_ANNOTATION = "gateway-extproc.io/kv-events-replay"

# Bound on the remembered (pod, label, value) triples already warned about.
_MAX_WARNED = 10_000


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

    @property
    def timing(self) -> WatchTiming:
        return WatchTiming(
            resync_period=self.resync_period,
            watch_timeout=self.watch_timeout,
            request_timeout=self.request_timeout,
            backoff_base=self.backoff_base,
            backoff_max=self.backoff_max,
            list_page_size=self.list_page_size,
        )


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
        annotations = meta.get("annotations") or {}
        kv_events = self._kv_endpoint(
            annotations, KV_EVENTS_ANNOTATION, self._options.kv_events_port, ip, key
        )
        replay = self._kv_endpoint(annotations, KV_EVENTS_REPLAY_ANNOTATION, 0, ip, key)
        return Pod(
            name=name,
            namespace=namespace,
            address=join_host_port(ip, port) if ip else "",
            metrics_address=join_host_port(ip, metric_port) if ip else "",
            models=(model,),
            ready=pod_ready(obj),
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
        return f"tcp://{join_host_port(ip, port)}"

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


def condition_true(status: Mapping[str, Any], kind: str) -> bool:
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == kind:
            return cond.get("status") == "True"
    return False


def join_host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def pod_ready(obj: Mapping[str, Any]) -> bool:
    """Running with the Ready condition true: the kubelet would send it Service traffic."""
    status = obj.get("status") or {}
    return status.get("phase") == "Running" and condition_true(status, "Ready")


# -- the source ---------------------------------------------------------------------------


class KubernetesSource(InformerSource):
    """Keeps `registry` equal to the model pods the API server reports.

    A DiscoverySource (models/source.py): `start()` runs one informer thread per scope;
    `stop()` ends them promptly, guarantees no registry write after it returns and waits
    (up to its timeout) for the threads to exit; `running` says whether one is still alive.
    """

    _loop: asyncio.AbstractEventLoop  # given at construction, never None here

    def __init__(
        self,
        registry: ModelRegistry,
        loop: asyncio.AbstractEventLoop,
        options: KubernetesOptions | None = None,
    ) -> None:
        super().__init__(registry, loop)
        self._options = options or KubernetesOptions()
        self._mapper = PodMapper(self._options)
        namespaces = tuple(dict.fromkeys(self._options.namespaces))  # dedupe, keep order
        self._informers = {ns: self._informer(ns) for ns in namespaces or ("",)}
        self._started = False
        # Loop-thread state: the pods each scope reported, undecorated by adapters.
        self._known: dict[str, Pod] = {}
        self._keys_by_scope: dict[str, set[str]] = {ns: set() for ns in self._informers}
        self._listed: set[str] = set()

    def _informer(self, namespace: str) -> Informer:
        opts = self._options

        def call(api: k8s_client.ApiClient, kwargs: dict[str, Any]) -> Any:
            core = k8s_client.CoreV1Api(api)
            if namespace:
                return core.list_namespaced_pod(namespace, **kwargs)
            return core.list_pod_for_all_namespaces(**kwargs)

        return Informer(
            name=f"pods/{namespace or '*'}",
            call=call,
            handler=_ScopeHandler(self, namespace),
            connect=lambda: new_api_client(opts.kubeconfig, opts.context),
            timing=opts.timing,
            label_selector=opts.model_label,
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self._options.adapter_discovery_interval > 0:
            self._adapters = AdapterDiscovery(
                self._registry,
                interval=self._options.adapter_discovery_interval,
                timeout=self._options.adapter_request_timeout,
            )
            self._loop.call_soon_threadsafe(self._adapters.start)
        for informer in self._informers.values():
            informer.start()
        log.info(
            "kubernetes_source_started",
            namespaces=[ns or "*" for ns in self._informers],
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
        return any(informer.alive for informer in self._informers.values())

    def _close(self) -> None:
        self._closed = True
        for informer in self._informers.values():
            informer.stop()
        if self._adapters is not None:
            self._adapters.stop()

    async def _wait_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for informer in self._informers.values():
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.to_thread(informer.join, remaining)
        if self._adapters is not None:
            await self._adapters.wait_closed()

    def resource_version(self, namespace: str = "") -> str | None:
        """The resourceVersion the next watch of `namespace` ("" = cluster-wide) starts from."""
        informer = self._informers.get(namespace)
        return informer.resource_version if informer is not None else None

    # -- the loop thread (synced: once every scope has listed) ----------------------------

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


@dataclass
class _ScopeHandler:
    """Maps one scope's pod objects on its informer thread and posts them to the loop."""

    source: KubernetesSource
    namespace: str

    def listed(self, items: list[dict[str, Any]]) -> None:
        mapper = self.source._mapper
        pods = [pod for obj in items if (pod := mapper(obj)) is not None]
        self.source._post(self.source._apply_list, self.namespace, pods)

    def changed(self, kind: str, obj: dict[str, Any]) -> None:
        pod = None if kind == "DELETED" else self.source._mapper(obj)
        if pod is None:
            # Deleted, or relabelled so that it no longer serves a model.
            self.source._post(self.source._apply_delete, self.namespace, object_key(obj))
        else:
            self.source._post(self.source._apply_upsert, self.namespace, pod)
