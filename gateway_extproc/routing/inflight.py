"""The processor's own count of requests in flight per pod.

Counted at the moment of the pick (so a burst cannot all land on one pod before any
engine metric moves) and released exactly once by the session that took it.
"""

from __future__ import annotations

from collections import defaultdict

from gateway_extproc import telemetry
from gateway_extproc.models.registry import Pod


class InFlightCounter:
    def __init__(self) -> None:
        self._by_pod: dict[str, int] = defaultdict(int)
        self._models_by_pod: dict[str, set[str]] = defaultdict(set)

    def count(self, pod_key: str) -> int:
        return self._by_pod.get(pod_key, 0)

    def acquire(self, model: str, pod: Pod) -> None:
        self._by_pod[pod.key] += 1
        self._models_by_pod[pod.key].add(model)
        telemetry.IN_FLIGHT.labels(model, pod.key).inc()

    def release(self, model: str, pod: Pod) -> None:
        left = self._by_pod.get(pod.key, 0) - 1
        if left > 0:
            self._by_pod[pod.key] = left
        else:
            self._by_pod.pop(pod.key, None)
        if pod.key in self._models_by_pod:
            telemetry.IN_FLIGHT.labels(model, pod.key).dec()

    def forget(self, pod: Pod) -> None:
        """Drop every trace of a deleted pod, its Prometheus series included."""
        self._by_pod.pop(pod.key, None)
        for model in self._models_by_pod.pop(pod.key, ()):
            telemetry.remove_series(telemetry.IN_FLIGHT, model, pod.key)

    def total(self) -> int:
        return sum(self._by_pod.values())
