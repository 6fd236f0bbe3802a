"""The processor's own count of requests in flight per pod.

Counted at the moment of the pick (so a burst cannot all land on one pod before any
engine metric moves) and released exactly once by the session that took it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from gateway_extproc import telemetry
from gateway_extproc.models.registry import Pod


class InFlightCounter:
    def __init__(self) -> None:
        self._by_pod: dict[str, int] = defaultdict(int)
        self._live_pods: set[str] = set()

    def count(self, pod_key: str) -> int:
        return self._by_pod.get(pod_key, 0)

    def by_pod(self) -> Mapping[str, int]:
        """The live counts by pod key (read-only): strategies read it once per pick."""
        return self._by_pod

    def acquire(self, model: str, pod: Pod) -> None:
        self._by_pod[pod.key] += 1
        self._live_pods.add(pod.key)
        telemetry.note_pod_series(model, pod.key)
        telemetry.IN_FLIGHT.labels(model, pod.key).inc()

    def release(self, model: str, pod: Pod) -> None:
        left = self._by_pod.get(pod.key, 0) - 1
        if left > 0:
            self._by_pod[pod.key] = left
        else:
            self._by_pod.pop(pod.key, None)
        if pod.key in self._live_pods:  # not once the pod was deleted: its series is gone
            telemetry.IN_FLIGHT.labels(model, pod.key).dec()

    def forget(self, pod: Pod) -> None:
        """Drop every trace of a deleted pod (its Prometheus series go with
        telemetry.forget_pod_series)."""
        self._by_pod.pop(pod.key, None)
        self._live_pods.discard(pod.key)

    def total(self) -> int:
        return sum(self._by_pod.values())
