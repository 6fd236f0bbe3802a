"""InferencePool source: the model dictionary is the endpoints of one InferencePool.

A Gateway API Inference Extension `InferencePool` (`inference.networking.k8s.io/v1`) names
the model-server pods (`spec.selector.matchLabels`) and the ports they serve on
(`spec.targetPorts`). Every matching pod times every target port is one endpoint: several
ports are the data-parallel ranks of one pod, each its own engine. This source runs two
informers (models/informer.py) in the pool's namespace, one on the pool (by name) and one
on the namespace's pods, and keeps the registry equal to the endpoints they describe:

- an edit of the pool (selector, ports) re-derives every endpoint at once, no restart;
- the pool's deletion (or its absence) empties the dictionary;
- a pod's model comes from its model label, else from its engine's `GET /v1/models`
  (models/adapters.py `ModelProbe`), asked once per endpoint address.

All pods of the namespace are watched and matched here, as the reference endpoint picker
does: a selector change then needs no new watch, only a second look at what is cached.

Endpoint names are `<pod>-rank-<i>` (i: the port's index in targetPorts), the reference
picker's convention. Registry writes happen on the event loop only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from kubernetes import client as k8s_client

from gateway_extproc.models.adapters import AdapterDiscovery, ModelProbe
from gateway_extproc.models.informer import (
    Informer,
    InformerSource,
    WatchTiming,
    new_api_client,
    object_key,
)
from gateway_extproc.models.kubernetes import DEFAULT_MODEL_LABEL, join_host_port, pod_ready
from gateway_extproc.models.registry import ModelRegistry, Pod

log = structlog.get_logger("gateway_extproc.inferencepool")

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"
# Where a pod finds its own namespace (the mounted service-account token's directory).
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def pool_namespace_from(flag_value: str) -> str:
    """`--pool-namespace`, else the namespace this process runs in, else `default`."""
    if flag_value:
        return flag_value
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """Which pool to follow, how to reach the cluster and how to read the pods."""

    name: str
    namespace: str = "default"
    kubeconfig: str | None = None
    context: str | None = None
    model_label: str = DEFAULT_MODEL_LABEL
    timing: WatchTiming = field(default_factory=WatchTiming)
    model_probe_retry: float = 2.0  # seconds between /v1/models attempts on one endpoint
    model_probe_timeout: float = 2.0
    adapter_discovery_interval: float = 0.0  # poll /v1/models for LoRA adapters; 0: off

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("the InferencePool needs a name (--pool-name)")
        if not self.namespace:
            raise ValueError("the InferencePool needs a namespace (--pool-namespace)")
        if not self.model_label:
            raise ValueError("model_label must not be empty")
        if self.model_probe_retry <= 0 or self.model_probe_timeout <= 0:
            raise ValueError("model_probe_retry and model_probe_timeout must be positive")
        if self.adapter_discovery_interval < 0:
            raise ValueError("adapter_discovery_interval must be >= 0")


# -- what the informers read ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """The two fields of an InferencePool that decide its endpoints."""

    match_labels: tuple[tuple[str, str], ...]
    target_ports: tuple[int, ...]

    def selects(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.match_labels)


class PoolSpecError(ValueError):
    """An InferencePool whose spec cannot be used (the API server would have refused it)."""


def parse_pool(obj: Mapping[str, Any]) -> PoolSpec:
    """The selector and ports of an InferencePool object; PoolSpecError if unusable."""
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise PoolSpecError("spec is missing")
    selector = spec.get("selector")
    labels = selector.get("matchLabels") if isinstance(selector, Mapping) else None
    if not isinstance(labels, Mapping) or not labels:
        raise PoolSpecError("spec.selector.matchLabels must name at least one label")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise PoolSpecError("spec.selector.matchLabels must map strings to strings")
    raw_ports = spec.get("targetPorts")
    if not isinstance(raw_ports, list) or not raw_ports:
        raise PoolSpecError("spec.targetPorts must list at least one port")
    ports: list[int] = []
    for entry in raw_ports:
        number = entry.get("number") if isinstance(entry, Mapping) else None
        if type(number) is not int or not 0 < number < 65536:
            raise PoolSpecError(f"spec.targetPorts entry {entry!r} is not a port number")
        if number in ports:
            raise PoolSpecError(f"spec.targetPorts lists port {number} twice")
        ports.append(number)
    return PoolSpec(tuple(sorted(labels.items())), tuple(ports))


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What the pool source keeps of one pod of the namespace."""

    name: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    ip: str
    ready: bool
    terminating: bool

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def label(self, name: str) -> str:
        return dict(self.labels).get(name, "")


def pod_info(obj: Mapping[str, Any]) -> PodInfo | None:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    labels = meta.get("labels") or {}
    status = obj.get("status") or {}
    return PodInfo(
        name=name,
        namespace=meta.get("namespace") or "",
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        ip=status.get("podIP") or "",
        ready=pod_ready(obj),
        terminating=bool(meta.get("deletionTimestamp")),
    )


# -- the source -----------------------------------------------------------------------------


class InferencePoolSource(InformerSource):
    """Keeps `registry` equal to the endpoints of one InferencePool (see module doc)."""

    def __init__(self, registry: ModelRegistry, options: PoolOptions) -> None:
        super().__init__(registry, None)
        self._options = options
        self._informers: list[Informer] = []
        self._probe = ModelProbe(
            self._on_models_found,
            retry=options.model_probe_retry,
            timeout=options.model_probe_timeout,
        )
        # Loop-thread state.
        self._pool: PoolSpec | None = None
        self._pool_listed = False
        self._pods: dict[str, PodInfo] = {}
        self._pods_listed = False
        self._endpoints: dict[str, set[str]] = {}  # pod key -> its endpoints' keys

    @property
    def pool(self) -> PoolSpec | None:
        """The pool's selector and ports as last seen; None while it does not exist."""
        return self._pool

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        opts = self._options
        if opts.adapter_discovery_interval > 0:
            self._adapters = AdapterDiscovery(
                self._registry,
                interval=opts.adapter_discovery_interval,
                timeout=opts.model_probe_timeout,
            )
            self._adapters.start()
        self._informers = [self._pool_informer(), self._pod_informer()]
        for informer in self._informers:
            informer.start()
        log.info("inferencepool_source_started", pool=f"{opts.namespace}/{opts.name}")

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop watching; no registry write happens after the first await returns."""
        self._closed = True
        for informer in self._informers:
            informer.stop()
        if self._adapters is not None:
            self._adapters.stop()
        await self._probe.close()
        for informer in self._informers:
            await asyncio.to_thread(informer.join, timeout)
        if self._adapters is not None:
            await self._adapters.wait_closed()

    def _pool_informer(self) -> Informer:
        opts = self._options

        def call(api: k8s_client.ApiClient, kwargs: dict[str, Any]) -> Any:
            return k8s_client.CustomObjectsApi(api).list_namespaced_custom_object(
                POOL_GROUP, POOL_VERSION, opts.namespace, POOL_PLURAL, **kwargs
            )

        return Informer(
            name=f"inferencepool/{opts.namespace}/{opts.name}",
            call=call,
            handler=_PoolHandler(self),
            connect=lambda: new_api_client(opts.kubeconfig, opts.context),
            timing=opts.timing,
            field_selector=f"metadata.name={opts.name}",
        )

    def _pod_informer(self) -> Informer:
        opts = self._options

        def call(api: k8s_client.ApiClient, kwargs: dict[str, Any]) -> Any:
            return k8s_client.CoreV1Api(api).list_namespaced_pod(opts.namespace, **kwargs)

        return Informer(
            name=f"pods/{opts.namespace}",
            call=call,
            handler=_PodHandler(self),
            connect=lambda: new_api_client(opts.kubeconfig, opts.context),
            timing=opts.timing,
        )

    # -- the loop thread (synced: once the pool and the namespace's pods have listed) ------

    def _apply_pool(self, spec: PoolSpec | PoolSpecError | None, listed: bool) -> None:
        if self._closed:
            return
        if isinstance(spec, PoolSpecError):
            # Keep what the last good spec said: a pool the API server would have refused
            # must not empty a working dictionary.
            log.error(
                "inferencepool_invalid",
                pool=f"{self._options.namespace}/{self._options.name}",
                problem=str(spec),
                keeping=self._pool is not None,
            )
            spec = self._pool
        if spec != self._pool:
            log.info(
                "inferencepool_changed" if spec else "inferencepool_absent",
                pool=f"{self._options.namespace}/{self._options.name}",
                match_labels=dict(spec.match_labels) if spec else None,
                target_ports=list(spec.target_ports) if spec else None,
            )
        self._pool = spec
        self._pool_listed = self._pool_listed or listed
        self._rebuild()

    def _apply_pod_list(self, pods: list[PodInfo]) -> None:
        if self._closed:
            return
        self._pods = {p.key: p for p in pods}
        self._pods_listed = True
        self._rebuild()

    def _apply_pod(self, key: str, pod: PodInfo | None) -> None:
        if self._closed:
            return
        if pod is None:
            self._pods.pop(key, None)
        else:
            self._pods[key] = pod
        if not self._ready_to_write():
            return
        wanted = {e.key: e for e in self._endpoints_of(pod)} if pod is not None else {}
        for gone in self._endpoints.pop(key, set()) - wanted.keys():
            self._registry.delete_pod(gone)
        for endpoint in wanted.values():
            self._registry.upsert_pod(self._decorate(endpoint))
        if wanted:
            self._endpoints[key] = set(wanted)
        self._forget_unused_probes()

    def _on_models_found(self, address: str) -> None:
        """The probe learnt what an address serves: write the pods that use it."""
        if self._closed:
            return
        for pod in [p for p in self._pods.values() if address in self._addresses(p)]:
            self._apply_pod(pod.key, pod)

    def _addresses(self, pod: PodInfo) -> list[str]:
        """The endpoint addresses of `pod` in the pool (none when it is not selected)."""
        pool = self._pool
        if pool is None or not pod.ip or not pool.selects(dict(pod.labels)):
            return []
        return [join_host_port(pod.ip, port) for port in pool.target_ports]

    def _ready_to_write(self) -> bool:
        return self._pool_listed and self._pods_listed

    def _rebuild(self) -> None:
        """Derive every endpoint from the pool and the pods and make the registry hold them."""
        if not self._ready_to_write():
            return
        endpoints: list[Pod] = []
        self._endpoints = {}
        for key, pod in self._pods.items():
            mine = self._endpoints_of(pod)
            if mine:
                self._endpoints[key] = {e.key for e in mine}
                endpoints.extend(mine)
        self._registry.replace_all([self._decorate(e) for e in endpoints])
        self._forget_unused_probes()
        if not self._synced.is_set():
            self._synced.set()
            log.info(
                "inferencepool_synced",
                pool=f"{self._options.namespace}/{self._options.name}",
                found=self._pool is not None,
                endpoints=len(endpoints),
            )

    def _endpoints_of(self, pod: PodInfo) -> list[Pod]:
        pool = self._pool
        if pool is None or not pool.selects(dict(pod.labels)):
            return []
        label = pod.label(self._options.model_label)
        out = []
        for rank, port in enumerate(pool.target_ports):
            address = join_host_port(pod.ip, port) if pod.ip else ""
            models: tuple[str, ...] = (label,) if label else ()
            if not models and address:
                models = self._probe.models(address) or ()
                if not models and pod.ready and not pod.terminating:
                    self._probe.want(address)
            if not models:
                continue  # which model it serves is not known (yet): not in the dictionary
            out.append(
                Pod(
                    name=f"{pod.name}-rank-{rank}",
                    namespace=pod.namespace,
                    address=address,
                    models=models,
                    ready=pod.ready,
                    terminating=pod.terminating,
                )
            )
        return out

    def _forget_unused_probes(self) -> None:
        self._probe.keep_only({a for pod in self._pods.values() for a in self._addresses(pod)})


@dataclass
class _PoolHandler:
    source: InferencePoolSource

    def listed(self, items: list[dict[str, Any]]) -> None:
        name = self.source._options.name
        found = [o for o in items if (o.get("metadata") or {}).get("name") == name]
        self._post(found[0] if found else None, listed=True)

    def changed(self, kind: str, obj: dict[str, Any]) -> None:
        if (obj.get("metadata") or {}).get("name") != self.source._options.name:
            return  # a server that ignores the field selector: not our pool
        self._post(None if kind == "DELETED" else obj, listed=False)

    def _post(self, obj: dict[str, Any] | None, *, listed: bool) -> None:
        spec: PoolSpec | PoolSpecError | None = None
        if obj is not None:
            try:
                spec = parse_pool(obj)
            except PoolSpecError as exc:
                spec = exc
        self.source._post(self.source._apply_pool, spec, listed)


@dataclass
class _PodHandler:
    source: InferencePoolSource

    def listed(self, items: list[dict[str, Any]]) -> None:
        pods = [info for obj in items if (info := pod_info(obj)) is not None]
        self.source._post(self.source._apply_pod_list, pods)

    def changed(self, kind: str, obj: dict[str, Any]) -> None:
        info = None if kind == "DELETED" else pod_info(obj)
        self.source._post(self.source._apply_pod, object_key(obj), info)
