"""Discovery sources: where the model dictionary comes from.

A source fills the ModelRegistry (`replace_all` once, then `upsert_pod`/`delete_pod`,
all on the event loop) and keeps it current until stopped. The processor picks one by
name (`--discovery NAME`) from `SOURCES`; adding a source is a class with the three
members of `DiscoverySource` plus one line in `SOURCES` (or `SOURCES[name] = factory`
from outside the package) and touches no server code. docs/architecture.md has the
recipe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from gateway_extproc.config import Settings
from gateway_extproc.models.registry import ModelRegistry


class DiscoverySource(Protocol):
    @property
    def synced(self) -> bool:
        """True once the first complete dictionary has reached the registry."""
        ...

    async def start(self) -> None:
        """Begin filling the registry; return without waiting for the first sync."""
        ...

    async def stop(self) -> None:
        """Stop; no registry write happens after this returns."""
        ...


SourceFactory = Callable[[Settings, ModelRegistry], DiscoverySource]


# The factories import their module when called: the Kubernetes client is slow to import
# and only a processor that uses it should pay for that.


def static_source(settings: Settings, registry: ModelRegistry) -> DiscoverySource:
    from gateway_extproc.models.static import StaticModelSource

    return StaticModelSource(
        registry, settings.models_file, interval=settings.models_reload_interval
    )


def kubernetes_source(settings: Settings, registry: ModelRegistry) -> DiscoverySource:
    from gateway_extproc.models.kubernetes import KubernetesOptions, KubernetesSource

    options = KubernetesOptions(
        kubeconfig=settings.kubeconfig or None,
        context=settings.kube_context or None,
        namespaces=settings.namespace,
        model_label=settings.model_label,
        port_label=settings.port_label,
        metric_port_label=settings.metric_port_label,
        default_port=settings.default_model_port,
        resync_period=settings.kube_resync_period,
        adapter_discovery_interval=settings.adapter_discovery_interval,
        # Engines' KV-cache events are only worth following when prompts can be tokenized.
        kv_events_port=settings.kv_events_port if settings.tokenizers_dir else 0,
    )
    return KubernetesSource(registry, asyncio.get_running_loop(), options)


def inferencepool_source(settings: Settings, registry: ModelRegistry) -> DiscoverySource:
    from gateway_extproc.models.inferencepool import (
        InferencePoolSource,
        PoolOptions,
        pool_namespace_from,
    )
    from gateway_extproc.models.informer import WatchTiming

    options = PoolOptions(
        name=settings.pool_name,
        namespace=pool_namespace_from(settings.pool_namespace),
        kubeconfig=settings.kubeconfig or None,
        context=settings.kube_context or None,
        model_label=settings.model_label,
        timing=WatchTiming(resync_period=settings.kube_resync_period),
        adapter_discovery_interval=settings.adapter_discovery_interval,
    )
    return InferencePoolSource(registry, options)


SOURCES: dict[str, SourceFactory] = {
    "static": static_source,
    "kubernetes": kubernetes_source,
    "inferencepool": inferencepool_source,
}


def source_names() -> list[str]:
    """The names `--discovery` accepts."""
    return list(SOURCES)


def create_source(settings: Settings, registry: ModelRegistry) -> DiscoverySource:
    """The source `settings.discovery` names (call on the event loop)."""
    try:
        factory = SOURCES[settings.discovery]
    except KeyError:
        raise ValueError(
            f"unknown discovery source {settings.discovery!r}; known: {', '.join(SOURCES)}"
        ) from None
    return factory(settings, registry)
