"""The processor's own count of requests in flight per pod.

Counted at the moment of the pick (so a burst cannot all land on one pod before any
engine metric moves) and released exactly once by the session that took it.

Every change is also noted in a short journal of pod keys, so that routing can keep its
per-candidate loads current by replaying the few changes since its last decision instead
of re-reading every pod's count (see `signals.LoadBook`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping

from gateway_extproc import telemetry
from gateway_extproc.models.registry import Pod

# Journal entries kept (at least): a reader further behind than this rebuilds in full.
JOURNAL_KEEP = 4096


class InFlightCounter:
    def __init__(self) -> None:
        self._by_pod: dict[str, int] = defaultdict(int)
        self._live_pods: set[str] = set()
        self._journal: list[str] = []
        self._dropped = 0  # journal entries trimmed from the front so far
        # Told of every release: a request held for room may go now (flowcontrol).
        self._release_listeners: list[Callable[[], None]] = []

    def count(self, pod_key: str) -> int:
        return self._by_pod.get(pod_key, 0)

    def by_pod(self) -> Mapping[str, int]:
        """The live counts by pod key (read-only): strategies read it once per pick."""
        return self._by_pod

    def mark(self) -> int:
        """The journal's position now: pass it to `changed_since` later."""
        return self._dropped + len(self._journal)

    def changed_since(self, mark: int) -> list[str] | None:
        """Keys of the pods whose count moved since `mark` (with repeats, in order), or
        None when the journal no longer reaches back that far."""
        start = mark - self._dropped
        if start < 0:
            return None
        return self._journal[start:]

    def on_release(self, listener: Callable[[], None]) -> None:
        self._release_listeners.append(listener)

    def acquire(self, model: str, pod: Pod) -> None:
        self._by_pod[pod.key] += 1
        self._note(pod.key)
        self._live_pods.add(pod.key)
        telemetry.note_pod_series(model, pod.key)
        telemetry.child(telemetry.IN_FLIGHT, model, pod.key).inc()

    def release(self, model: str, pod: Pod) -> None:
        left = self._by_pod.get(pod.key, 0) - 1
        if left > 0:
            self._by_pod[pod.key] = left
        else:
            self._by_pod.pop(pod.key, None)
        self._note(pod.key)
        if pod.key in self._live_pods:  # not once the pod was deleted: its series is gone
            telemetry.child(telemetry.IN_FLIGHT, model, pod.key).dec()
        for listener in self._release_listeners:
            listener()

    def forget(self, pod: Pod) -> None:
        """Drop every trace of a deleted pod (its Prometheus series go with
        telemetry.forget_pod_series)."""
        self._by_pod.pop(pod.key, None)
        self._note(pod.key)
        self._live_pods.discard(pod.key)

    def total(self) -> int:
        return sum(self._by_pod.values())

    def _note(self, pod_key: str) -> None:
        journal = self._journal
        journal.append(pod_key)
        if len(journal) >= 2 * JOURNAL_KEEP:  # trimmed in halves: amortised O(1)
            del journal[:JOURNAL_KEEP]
            self._dropped += JOURNAL_KEEP
