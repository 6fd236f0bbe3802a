"""Passive health: pods that keep failing are ejected from routing for a while.

Nothing here sends a request of its own. The processor already sees how every routed
request ends (the response status, and with envoy/envoy.yaml Envoy's response code
details) and whether each pod's metrics endpoint accepts connections; a pod whose last
`eject_after` outcomes in a row were failures is left out of routing, as Envoy's outlier
detection does:

- ejected for `base_seconds * 2**k` (capped at `max_seconds`), k being how many times in
  a row it was ejected without a success in between;
- when that time is over the pod is half-open: it takes one request (a probe) while
  nothing else is in flight on it. The probe's success lets it back in (and resets k);
  any failure ejects it again, for twice as long;
- never more than `max_fraction` of a model's candidates are left out (at least one
  pod may always be); when every candidate is ejected the request is routed anyway.

What counts as a failure (see `verdict`): a response Envoy made because the pod could not
be reached or did not answer in time (response code details `upstream_reset_*`,
`upstream_*timeout*`, ...), an engine's own 5xx, and a metrics scrape refused or left
unanswered at the pod's serving address (a hung engine still accepts connections, and
its requests wait for Envoy's idle timeout: its scrapes are what shows it soon). A 4xx
is the engine working. A request the client cancelled says nothing about the pod.
Without code details (Envoy Gateway's filter, older configs) any
5xx counts, as Envoy's own consecutive-5xx detection counts them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import structlog

from gateway_extproc import telemetry
from gateway_extproc.models.registry import Pod

log = structlog.get_logger("gateway_extproc.health")


class Verdict(Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"  # says nothing about the pod


# Response code details Envoy gives a response it made because the upstream failed:
# refused or reset connections, no answer within a route or per-try timeout.
_UPSTREAM_FAILURE_DETAILS = (
    "upstream_reset_before_response_started",
    "upstream_reset_after_response_started",
    "upstream_response_timeout",
    "upstream_per_try_timeout",
    "upstream_per_try_idle_timeout",
    "upstream_max_stream_duration_reached",
)
ENGINE_DETAILS = "via_upstream"  # the response came from the engine


def verdict(status: int, details: str | None) -> tuple[Verdict, str]:
    """What a finished response says about the pod that served it, and why.

    `details` is Envoy's response code details (None when Envoy did not send them)."""
    if details is None:
        return (Verdict.FAILURE, f"status_{status}") if status >= 500 else (Verdict.SUCCESS, "")
    if details == ENGINE_DETAILS:
        return (Verdict.FAILURE, f"status_{status}") if status >= 500 else (Verdict.SUCCESS, "")
    if details.startswith(_UPSTREAM_FAILURE_DETAILS):
        return Verdict.FAILURE, details.partition("{")[0]
    # Envoy answered for another reason (a body over its buffer, say): not the pod's doing.
    return Verdict.NEUTRAL, ""


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    eject_after: int = 5  # consecutive failures; 0 turns passive health off
    base_seconds: float = 5.0
    max_seconds: float = 60.0
    max_fraction: float = 0.5

    def ejection_seconds(self, previous: int) -> float:
        """How long an ejection lasts after `previous` ones in a row."""
        return min(self.base_seconds * 2.0 ** min(previous, 62), self.max_seconds)


class _State:
    """A pod with a failure since its last success, or ejected."""

    __slots__ = ("ejected_at", "ejections", "failures", "until")

    def __init__(self) -> None:
        self.failures = 0  # consecutive, since the last success
        self.ejections = 0  # in a row, without a success in between
        self.ejected_at = 0.0
        self.until = 0.0  # ejected while the clock is below this (0: not ejected)


class PodHealth:
    def __init__(
        self,
        policy: HealthPolicy | None = None,
        *,
        in_flight: Callable[[str], int] = lambda _key: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or HealthPolicy()
        self._in_flight = in_flight
        self._clock = clock
        # Only pods with something to remember.
        self._pods: dict[str, _State] = {}
        # The ejected ones (half-open included): routing looks at these alone, so that
        # with none (the common case) it pays one truth test, and with a few elsewhere
        # in the fleet a few set operations, whatever the number of candidates.
        self._ejected: set[str] = set()
        # By candidate tuple (the registry's per-model views are long-lived tuples):
        # its keys, and the last filtered result with the keys it left out.
        self._keys: dict[int, tuple[tuple[Pod, ...], frozenset[str]]] = {}
        self._filtered: dict[int, tuple[tuple[Pod, ...], frozenset[str], tuple[Pod, ...]]] = {}

    # -- routing ------------------------------------------------------------------------

    def healthy(self, pod_key: str) -> bool:
        """Whether routing may send this pod a request now."""
        if pod_key not in self._ejected:
            return True
        return self._admits(pod_key, self._clock())

    def _admits(self, pod_key: str, now: float) -> bool:
        if now < self._pods[pod_key].until:
            return False
        # Half-open: one probe at a time, and only once earlier requests have ended.
        return self._in_flight(pod_key) == 0

    def usable(self, candidates: tuple[Pod, ...]) -> tuple[Pod, ...]:
        """`candidates` without the ejected pods, within the policy's max fraction; all of
        them when every one is ejected."""
        if not self._ejected:
            return candidates
        now = self._clock()
        out = frozenset(key for key in self._ejected if not self._admits(key, now))
        if not out:
            return candidates
        out &= self._keys_of(candidates)
        if not out:
            return candidates
        cached = self._filtered.get(id(candidates))
        if cached is not None and cached[0] is candidates and cached[1] == out:
            return cached[2]
        kept = self._leave_out(candidates, out)
        _remember(self._filtered, candidates, (candidates, out, kept))
        return kept

    def _leave_out(self, candidates: tuple[Pod, ...], out: frozenset[str]) -> tuple[Pod, ...]:
        if len(out) == len(candidates):
            return candidates  # every one is ejected: route anyway
        allowed = max(1, math.floor(self.policy.max_fraction * len(candidates)))
        if len(out) > allowed:
            # Over the cap: the pods whose ejection ends soonest are let back in first.
            out = frozenset(sorted(out, key=lambda key: self._pods[key].until)[-allowed:])
        return tuple(p for p in candidates if p.key not in out)

    def _keys_of(self, candidates: tuple[Pod, ...]) -> frozenset[str]:
        cached = self._keys.get(id(candidates))
        if cached is not None and cached[0] is candidates:
            return cached[1]
        keys = frozenset(p.key for p in candidates)
        _remember(self._keys, candidates, (candidates, keys))
        return keys

    # -- outcomes -----------------------------------------------------------------------

    def record(self, pod_key: str, outcome: Verdict, reason: str = "") -> None:
        if outcome is Verdict.SUCCESS:
            self.success(pod_key)
        elif outcome is Verdict.FAILURE:
            self.failure(pod_key, reason)

    def success(self, pod_key: str) -> None:
        state = self._pods.get(pod_key)
        if state is None:
            return
        if state.until and self._clock() < state.until:
            return  # a request from before the ejection; only a probe lets the pod back
        del self._pods[pod_key]
        if not state.until:
            return  # the run of failures is over
        self._ejected.discard(pod_key)
        telemetry.PODS_EJECTED.dec()
        log.info(
            "pod_restored",
            pod=pod_key,
            ejected_for_s=round(self._clock() - state.ejected_at, 3),
            ejections=state.ejections,
        )

    def failure(self, pod_key: str, reason: str) -> None:
        policy = self.policy
        if policy.eject_after <= 0:
            return
        state = self._pods.get(pod_key)
        if state is None:
            state = self._pods[pod_key] = _State()
        now = self._clock()
        if state.until:
            if now < state.until:
                return  # already out; its clock runs from the failure that ejected it
            self._eject(pod_key, state, now, reason)  # the probe (or a scrape) failed
            return
        state.failures += 1
        if state.failures >= policy.eject_after:
            telemetry.PODS_EJECTED.inc()
            self._eject(pod_key, state, now, reason)

    def scrape_unreachable(self, pod: Pod, reason: str = "connect") -> None:
        """A metrics scrape could not connect, or got no answer in time (`reason`).
        Counted only when the metrics are served at the serving address: a separate
        metrics port being down says nothing about whether the engine answers requests."""
        if pod.scrape_address == pod.address:
            self.failure(pod.key, f"scrape_{reason}")

    def forget(self, pod: Pod) -> None:
        """A deleted pod: nothing of it stays (its series go too)."""
        state = self._pods.pop(pod.key, None)
        if state is not None and state.until:
            self._ejected.discard(pod.key)
            telemetry.PODS_EJECTED.dec()
        telemetry.remove_series(telemetry.POD_EJECTIONS, pod.key)

    # -- what the admin endpoint shows -------------------------------------------------

    def describe(self, pod_key: str) -> dict[str, object]:
        state = self._pods.get(pod_key)
        if state is None:
            return {"state": "healthy"}
        if not state.until:
            return {"state": "healthy", "failures": state.failures}
        now = self._clock()
        return {
            "state": "ejected" if now < state.until else "half_open",
            "ejections": state.ejections,
            "seconds_left": round(max(0.0, state.until - now), 3),
        }

    def _eject(self, pod_key: str, state: _State, now: float, reason: str) -> None:
        seconds = self.policy.ejection_seconds(state.ejections)
        state.ejections += 1
        state.failures = 0
        state.ejected_at = now if not state.until else state.ejected_at
        state.until = now + seconds
        self._ejected.add(pod_key)
        telemetry.POD_EJECTIONS.labels(pod_key).inc()
        log.warning(
            "pod_ejected",
            pod=pod_key,
            reason=reason,
            seconds=seconds,
            ejections=state.ejections,
            hint="left out of routing until then; the first request after it is a probe",
        )


# Candidate tuples come from the registry's views (one per model, replaced when the
# model changes) or from a request's subset hint (new each time): a bounded memory.
_REMEMBERED = 1024


def _remember(cache: dict[int, Any], candidates: tuple[Pod, ...], entry: Any) -> None:
    if len(cache) >= _REMEMBERED:
        cache.clear()
    cache[id(candidates)] = entry
