"""Saturation: is a pod too busy to take another request now?

A pod is saturated when its engine reports more waiting requests than
`--saturation-queue`, or when the requests this processor has in flight on it reach
`--max-inflight-per-pod` (0 turns either check off). A pod without fresh metrics is
judged by its in-flight count alone: missing data never makes a pod look full.

The set of saturated pods is kept current from the in-flight counter's journal and the
metrics store's journal, a few pod keys per request, so that the common question "is
anything saturated at all?" costs nothing on a fleet of thousands of pods.

`filter` drops saturated pods, and hands back the very same tuple when nothing was
dropped, since strategies cache per-candidate state by the tuple's identity;
`NotSaturated` is it as a routing filter (routing/plugins.py), which the server hands to
the router.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway_extproc.metrics.store import MetricsStore
from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.plugins import Filter

# Filtered candidate tuples kept, by the identity of the tuple they came from.
_FILTER_CACHE = 64


class SaturationDetector:
    def __init__(
        self,
        store: MetricsStore,
        inflight: InFlightCounter,
        *,
        queue_threshold: int,
        max_inflight: int,
    ) -> None:
        self._store = store
        self._inflight = inflight
        self.queue_threshold = queue_threshold
        self.max_inflight = max_inflight
        self._saturated: set[str] = set()
        self._generation = 0  # moves whenever `_saturated` changes
        self._inflight_mark = inflight.mark()
        self._store_version = store.fresh_version()
        self._filtered: dict[int, tuple[tuple[Pod, ...], int, tuple[Pod, ...]]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.queue_threshold or self.max_inflight)

    def saturated_keys(self) -> set[str]:
        """Keys of the pods saturated now (the live set: read it, never change it)."""
        if self.enabled:
            self._catch_up()
        return self._saturated

    def is_saturated(self, pod: Pod) -> bool:
        return pod.key in self.saturated_keys()

    def has_room(self, pods: Sequence[Pod]) -> bool:
        """Whether any of `pods` can take a request now."""
        saturated = self.saturated_keys()
        if not saturated:  # the usual case: no Python step per pod
            return bool(pods)
        return any(pod.key not in saturated for pod in pods)

    def filter(self, candidates: tuple[Pod, ...]) -> tuple[Pod, ...]:
        """The candidates that are not saturated (the same tuple when all are not)."""
        saturated = self.saturated_keys()
        if not saturated:
            return candidates
        cached = self._filtered.get(id(candidates))
        if cached is not None and cached[0] is candidates and cached[1] == self._generation:
            return cached[2]
        kept = tuple(p for p in candidates if p.key not in saturated)
        result = candidates if len(kept) == len(candidates) else kept
        if len(self._filtered) >= _FILTER_CACHE:
            self._filtered.clear()
        self._filtered[id(candidates)] = (candidates, self._generation, result)
        return result

    # -- keeping the set current --------------------------------------------------------

    def _catch_up(self) -> None:
        moved = self._inflight.changed_since(self._inflight_mark)
        self._inflight_mark = self._inflight.mark()
        version = self._store.fresh_version()  # expires stale metrics first
        scraped = self._store.changed_since(self._store_version)
        self._store_version = version
        if moved is None or scraped is None:
            self._rebuild()
            return
        if moved or scraped:
            for key in {*moved, *scraped}:
                self._update(key)

    def _rebuild(self) -> None:
        keys: set[str] = {*self._inflight.by_pod(), *self._store.waiting(), *self._saturated}
        for key in keys:
            self._update(key)

    def _update(self, key: str) -> None:
        full = self._full(key)
        if full != (key in self._saturated):
            self._generation += 1
            if full:
                self._saturated.add(key)
            else:
                self._saturated.discard(key)

    def _full(self, key: str) -> bool:
        if self.max_inflight and self._inflight.count(key) >= self.max_inflight:
            return True
        if self.queue_threshold:
            return self._store.waiting().get(key, 0) > self.queue_threshold
        return False


class NotSaturated(Filter):
    """Routing filter: leave out saturated pods. A preference: when every candidate is
    full (flow control would have held the request before it got here) it keeps them
    all, never turning a routable request into an error."""

    name = "not-saturated"
    fail_open = True

    def __init__(self, detector: SaturationDetector) -> None:
        self.detector = detector

    def filter(self, candidates: Sequence[Pod], request: RoutingRequest) -> Sequence[Pod]:
        pods = candidates if isinstance(candidates, tuple) else tuple(candidates)
        return self.detector.filter(pods)


def routable_in(pods: Sequence[Pod], subset: frozenset[str] | None) -> Sequence[Pod]:
    """The pods a request may go to: all routable ones, or those inside Envoy's subset."""
    if subset is None:
        return pods
    return [p for p in pods if p.address in subset]
