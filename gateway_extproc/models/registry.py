"""ModelRegistry: the model dictionary that routing reads and discovery sources write.

Sources (the static file, the Kubernetes informer) describe *pods*; a pod serves one or
more model names. The registry derives each model's state from its pods and keeps, per
model, an immutable view (state + routable pods) rebuilt only when something changes, so
that the per-request lookup is one dict access.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from gateway_extproc.models.aliases import Alias

log = structlog.get_logger("gateway_extproc.models")


class ModelState(StrEnum):
    READY = "ready"  # at least one routable pod
    UNAVAILABLE = "unavailable"  # pods exist, none routable
    TERMINATING = "terminating"  # every pod is being deleted
    ABSENT = "absent"  # not in the dictionary


@dataclass(frozen=True, slots=True)
class Pod:
    """One model-server pod as a discovery source sees it.

    `address` is the serving `ip:port` Envoy connects to; `metrics_address` is where the
    engine's Prometheus text is scraped (defaults to the serving address); `kv_events` is
    the engine's KV-cache event publisher (`tcp://host:port`, empty when it has none) and
    `kv_events_replay` its replay socket.
    """

    name: str
    address: str
    models: tuple[str, ...]
    ready: bool = True
    terminating: bool = False
    metrics_address: str = ""
    namespace: str = ""
    kv_events: str = ""
    kv_events_replay: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def routable(self) -> bool:
        return self.ready and not self.terminating and bool(self.address)

    @property
    def scrape_address(self) -> str:
        return self.metrics_address or self.address


@dataclass(frozen=True, slots=True)
class ModelView:
    """What a request sees of one model: its state and the pods it may be sent to."""

    name: str
    state: ModelState
    routable: tuple[Pod, ...] = ()
    pods: tuple[Pod, ...] = ()


ModelChangeListener = Callable[[str, ModelState, ModelState], None]
PodRemovedListener = Callable[[Pod], None]
PodStoredListener = Callable[[Pod], None]


@dataclass
class ModelRegistry:
    """Pods by key, and the per-model views derived from them.

    Not thread-safe by design: every write happens on the event loop (blocking sources
    hand their events over with `call_soon_threadsafe`).
    """

    _pods: dict[str, Pod] = field(default_factory=dict)
    _views: dict[str, ModelView] = field(default_factory=dict)
    # model -> its pods' keys, in insertion order (a dict used as an ordered set), so a
    # view is rebuilt without sorting.
    _keys_by_model: dict[str, dict[str, None]] = field(default_factory=dict)
    _model_listeners: list[ModelChangeListener] = field(default_factory=list)
    _pod_listeners: list[PodRemovedListener] = field(default_factory=list)
    _stored_listeners: list[PodStoredListener] = field(default_factory=list)
    synced: bool = False
    # Why the source's latest data was not applied (a rejected models file), in words
    # for /readyz; empty when its latest data is in force.
    problem: str = ""
    # Model -> its Hugging Face tokenizer directory, where a source knows one (the models
    # file's `tokenizer:`); read live by the tokenizer catalog.
    tokenizers: dict[str, str] = field(default_factory=dict)
    # Alias name -> its weighted targets (models/aliases.py), where a source declares
    # them (the models file's `aliases:`); read per request by the session.
    aliases: dict[str, Alias] = field(default_factory=dict)

    # -- reading (hot path) -------------------------------------------------------------

    def lookup(self, model: str) -> ModelView:
        return self._views.get(model) or ModelView(name=model, state=ModelState.ABSENT)

    def pod(self, key: str) -> Pod | None:
        return self._pods.get(key)

    def is_routable(self, pod: Pod, model: str) -> bool:
        """The pick-time check: is this pod, as the registry knows it *now*, usable?"""
        current = self._pods.get(pod.key)
        return current is not None and current.routable and model in current.models

    def models(self) -> dict[str, ModelView]:
        return dict(self._views)

    def pods(self) -> list[Pod]:
        return list(self._pods.values())

    # -- listening ----------------------------------------------------------------------

    def on_model_change(self, listener: ModelChangeListener) -> None:
        self._model_listeners.append(listener)

    def on_pod_removed(self, listener: PodRemovedListener) -> None:
        self._pod_listeners.append(listener)

    def set_tokenizers(self, directories: Mapping[str, str]) -> None:
        """The models' tokenizer directories, as the source now says (replacing all)."""
        self.tokenizers.clear()
        self.tokenizers.update(directories)

    def set_aliases(self, aliases: Mapping[str, Alias]) -> None:
        """The aliases, as the source now says (replacing all). An alias whose targets did
        not change keeps its place in the round robin, so a reload does not skew a split."""
        kept = {
            name: old
            for name, old in self.aliases.items()
            if name in aliases and aliases[name].targets == old.targets
        }
        self.aliases = {name: kept.get(name, alias) for name, alias in aliases.items()}

    def on_pod_stored(self, listener: PodStoredListener) -> None:
        """`listener(pod)` after a pod is added or changed (not when written unchanged)."""
        self._stored_listeners.append(listener)

    # -- writing (sources) --------------------------------------------------------------

    def upsert_pod(self, pod: Pod) -> None:
        touched = self._store(pod)
        self._refresh(touched)
        if touched:
            self._tell_stored(pod)

    def delete_pod(self, key: str) -> None:
        touched, removed = self._remove(key)
        self._refresh(touched)
        if removed is not None:
            self._tell_removed(removed)

    def replace_all(self, pods: Iterable[Pod]) -> None:
        """Make the registry hold exactly `pods` (a full list or a static file reload).

        Each model's view is rebuilt once at the end, not once per pod: a relist of
        thousands of pods stays linear."""
        wanted = {p.key: p for p in pods}
        touched: set[str] = set()
        removed: list[Pod] = []
        stored: list[Pod] = []
        for key in [k for k in self._pods if k not in wanted]:
            models, pod = self._remove(key)
            touched |= models
            if pod is not None:
                removed.append(pod)
        for pod in wanted.values():
            models = self._store(pod)
            if models:
                stored.append(pod)
            touched |= models
        self._refresh(touched)
        for pod in removed:
            self._tell_removed(pod)
        for pod in stored:
            self._tell_stored(pod)
        self.synced = True

    def _store(self, pod: Pod) -> set[str]:
        """Write `pod`; the models whose views must be rebuilt."""
        old = self._pods.get(pod.key)
        if old == pod:
            return set()
        self._pods[pod.key] = pod
        if old is None or old.models != pod.models:
            self._index(old, remove=True)
            self._index(pod, remove=False)
        return _models_of(old, pod)

    def _remove(self, key: str) -> tuple[set[str], Pod | None]:
        old = self._pods.pop(key, None)
        if old is None:
            return set(), None
        self._index(old, remove=True)
        return set(old.models), old

    def _tell_removed(self, pod: Pod) -> None:
        for listener in self._pod_listeners:
            listener(pod)

    def _tell_stored(self, pod: Pod) -> None:
        for listener in self._stored_listeners:
            listener(pod)

    # -- derivation ---------------------------------------------------------------------

    def _index(self, pod: Pod | None, *, remove: bool) -> None:
        if pod is None:
            return
        for name in pod.models:
            keys = self._keys_by_model.setdefault(name, {})
            if remove:
                keys.pop(pod.key, None)
                if not keys:
                    del self._keys_by_model[name]
            else:
                keys[pod.key] = None

    def _refresh(self, model_names: set[str]) -> None:
        for name in model_names:
            before = self._views.get(name)
            pods = tuple(self._pods[k] for k in self._keys_by_model.get(name, ()))
            after = _derive_view(name, pods)
            if after.state is ModelState.ABSENT:
                self._views.pop(name, None)
            else:
                self._views[name] = after
            old_state = before.state if before else ModelState.ABSENT
            if old_state is not after.state:
                log.info(
                    "model_state_changed",
                    model=name,
                    old=old_state.value,
                    new=after.state.value,
                    pods=len(pods),
                    routable=len(after.routable),
                )
                for listener in self._model_listeners:
                    listener(name, old_state, after.state)


def _models_of(old: Pod | None, new: Pod) -> set[str]:
    names = set(new.models)
    if old is not None:
        names.update(old.models)
    return names


def _derive_view(name: str, pods: tuple[Pod, ...]) -> ModelView:
    if not pods:
        return ModelView(name=name, state=ModelState.ABSENT)
    routable = tuple(p for p in pods if p.routable)
    if routable:
        state = ModelState.READY
    elif all(p.terminating for p in pods):
        state = ModelState.TERMINATING
    else:
        state = ModelState.UNAVAILABLE
    return ModelView(name=name, state=state, routable=routable, pods=pods)
