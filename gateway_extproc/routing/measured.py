"""Latency the gateway measures itself, per pod, from the responses it follows.

Every routed response the processor sees to its end gives the pod's time to first token
(TTFT, from the request reaching the processor to the first streamed token), its mean
time per output token after that (TPOT) and its duration. They are kept per pod as
decayed means, so a slow pod shows at any load (in-flight counts cannot tell a slow pod
from a fast one when every pod has 0 or 1 request) and with engines that export no
latency histograms at all.

TTFT depends on the request: most of it is the prefill of the prompt tokens the engine
does not hold in its prefix cache. So the tracker fits one line over the whole fleet,
TTFT = base + per_char x uncached prompt characters (least squares over decayed sums; the
uncached length is what routing expected when it picked the pod), and keeps per pod its
*slowness*: the geometric mean of its TTFT over the line's value for the same request
(each ratio clipped, so one request that queued cannot brand a pod slow). A pod's
expected TTFT for a request is then slowness x line(uncached). Characters stand in for
tokens (the processor does not tokenize); within one model they are proportional.

A TTFT nearer to what a cache miss costs than to the hit routing expected counts as the
miss it was (the prefix was evicted sooner than thought, or was still being computed
for an earlier request), so it teaches neither the line nor the pod's slowness wrongly.
The prefill routing expected the pod still had to do for earlier requests (its
backlog) is taken out of a TTFT before it teaches speed, in the share the fleet's samples
show it to delay a request (`backlog_weight`).

Old samples fade two ways: each newer sample of the same pod (or, for the line, of the
fleet) weighs more, and every weight halves every `half_life` seconds. A pod with little
or old data is pulled towards the fleet's typical slowness (1.0) by a prior worth
PRIOR_SAMPLES samples: a new pod is tried like any other, and a pod that was avoided for
being slow is tried again after a few half-lives, so one that recovered gets its traffic
back. Values that are not finite and non-negative are ignored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat

# A pod's slowness with no samples, and how many samples that prior is worth.
PRIOR_SLOWNESS = 1.0
PRIOR_SAMPLES = 2.0
# One response counts as at most this many times slower or faster than the line: a
# request that queued says little about the pod's speed, and must not brand it slow for
# minutes.
MAX_SAMPLE_RATIO = 3.0
# Without enough samples for a line: TTFT is taken as this base plus this much per
# uncached prompt character (about 80 us per token at 4 characters a token).
DEFAULT_BASE_S = 0.02
DEFAULT_S_PER_CHAR = 2e-5
# The line needs this many samples (decayed per sample) before it replaces the
# defaults, and before samples are judged against it for the pods' slowness.
MIN_LINE_WEIGHT = 5.0
# Seconds between refreshes of every pod's slowness (it fades with a half-life of a
# minute; an observed pod's is refreshed at once).
REFRESH_S = 1.0
# The share of a pod's prefill backlog taken to delay a new request before the fleet's
# responses have shown it (see `backlog_weight`).
BACKLOG_PRIOR = 0.5
# With prompts of nearly one length the slope is unknown: it leans towards "all of TTFT
# is prefill" (the slope through the origin) unless the uncached lengths spread by more
# than this fraction of their mean.
PRIOR_SPREAD = 0.1


@dataclass(frozen=True, slots=True)
class ResponseTiming:
    """What the gateway saw of one finished response (seconds; None: not seen)."""

    pod_key: str
    request_id: str
    ttft: float | None
    tpot: float | None
    duration: float | None


def _usable(value: float | None) -> float | None:
    if value is None or not 0.0 <= value < math.inf:
        return None
    return value


class DecayedMean:
    """A mean whose samples fade: each new one multiplies the old weight by `keep`, and
    all weight halves every `half_life` seconds."""

    __slots__ = ("at", "value", "weight")

    def __init__(self) -> None:
        self.value = 0.0
        self.weight = 0.0
        self.at = 0.0

    def weight_at(self, now: float, half_life: float) -> float:
        if self.weight <= 0.0:
            return 0.0
        return self.weight * 0.5 ** (max(0.0, now - self.at) / half_life)

    def add(self, sample: float, now: float, keep: float, half_life: float) -> None:
        old = self.weight_at(now, half_life) * keep
        self.value = (self.value * old + sample) / (old + 1.0)
        self.weight = old + 1.0
        self.at = max(self.at, now)


class _Line:
    """TTFT against uncached characters: decayed least-squares sums over the fleet."""

    __slots__ = ("at", "s0", "sx", "sxx", "sxy", "sy")

    def __init__(self) -> None:
        self.s0 = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.at = 0.0

    def add(self, x: float, y: float, now: float, keep: float, half_life: float) -> None:
        fade = keep * 0.5 ** (max(0.0, now - self.at) / half_life) if self.s0 else 0.0
        self.s0 = self.s0 * fade + 1.0
        self.sx = self.sx * fade + x
        self.sy = self.sy * fade + y
        self.sxx = self.sxx * fade + x * x
        self.sxy = self.sxy * fade + x * y
        self.at = max(self.at, now)

    def coefficients(self) -> tuple[float, float]:
        """(base seconds, seconds per uncached character)."""
        s0 = self.s0
        mx, my = self.sx / s0, self.sy / s0
        if mx <= 0.0:
            return my, 0.0
        through_origin = my / mx
        var = max(0.0, self.sxx / s0 - mx * mx)
        cov = self.sxy / s0 - mx * my
        prior = (PRIOR_SPREAD * mx) ** 2
        slope = (cov + prior * through_origin) / (var + prior)
        # Neither a negative prefill cost nor a negative base.
        slope = min(max(slope, 0.0), through_origin)
        return my - slope * mx, slope


class _Pod:
    __slots__ = ("duration", "slowness", "tpot", "ttft")

    def __init__(self) -> None:
        self.ttft = DecayedMean()
        self.tpot = DecayedMean()
        self.duration = DecayedMean()
        self.slowness = DecayedMean()


class MeasuredLatency:
    """Per-pod TTFT, TPOT and duration as the gateway observed them (see the module
    docstring). Not thread-safe: fed and read on the event loop."""

    def __init__(
        self,
        *,
        half_life: float = 60.0,
        pod_keep: float = 0.9,
        fleet_keep: float = 0.98,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if half_life <= 0 or not 0.0 < pod_keep <= 1.0 or not 0.0 < fleet_keep <= 1.0:
            raise ValueError("half_life must be positive and the keep factors in (0, 1]")
        self.half_life = half_life
        self.pod_keep = pod_keep
        self.fleet_keep = fleet_keep
        self.clock = clock
        self._pods: dict[str, _Pod] = {}
        # pod -> slowness, for the pods with samples: brought up to date for a pod when
        # it is observed and for all every REFRESH_S (their weights fade slowly), so a
        # decision reads every candidate's with one lookup each.
        self._slowness: dict[str, float] = {}
        self._slowness_at = -math.inf
        self._line = _Line()
        self._queue = _Line()  # TTFT beyond the pod's speed, against the backlog
        self._duration = DecayedMean()  # fleet-wide, for pods without their own

    # -- writing ------------------------------------------------------------------------

    def observe(
        self,
        pod_key: str,
        *,
        ttft: float | None = None,
        tpot: float | None = None,
        duration: float | None = None,
        uncached_chars: float | None = None,
        prompt_chars: float | None = None,
        backlog: float = 0.0,
        now: float | None = None,
    ) -> None:
        """One finished response of `pod_key`; `uncached_chars` is the prompt length the
        pod was expected not to hold cached, of `prompt_chars` (None: unknown, then TTFT
        only updates the pod's mean, not the line or its slowness), and `backlog` the
        seconds of prefill routing expected the pod still had to do for earlier requests
        when this one was sent."""
        now = self.clock() if now is None else now
        pod = self._pods.get(pod_key)
        if pod is None:
            pod = self._pods[pod_key] = _Pod()
        keep, half = self.pod_keep, self.half_life
        ttft, tpot, duration = _usable(ttft), _usable(tpot), _usable(duration)
        uncached = _usable(uncached_chars)
        prompt = _usable(prompt_chars)
        if tpot is not None:
            pod.tpot.add(tpot, now, keep, half)
        if duration is not None:
            pod.duration.add(duration, now, keep, half)
            self._duration.add(duration, now, self.fleet_keep, half)
        if ttft is None:
            return
        pod.ttft.add(ttft, now, keep, half)
        if uncached is None:
            return
        if prompt is not None and prompt > uncached:
            uncached = self._explained(pod_key, ttft, uncached, prompt, now)
        backlog = _usable(backlog) or 0.0
        if backlog > 0.0 and self._line.s0 >= MIN_LINE_WEIGHT:
            # How much of the backlog showed in this TTFT, beyond what the pod's speed
            # explains: the engines' share of prefill work that runs one after another.
            alone = self.slowness(pod_key, now) * self._line_value(uncached, now)
            self._queue.add(backlog, ttft - alone, now, self.fleet_keep, half)
        # What this TTFT would have been without the backlog teaches speed (at least
        # part of it is always the request's own).
        ttft = max(ttft - self.backlog_weight() * backlog, ttft / MAX_SAMPLE_RATIO)
        # The pod's slowness is judged against the line as it stood before this sample,
        # averaged as logarithms (a geometric mean) so one outlier moves it little, and
        # only once the line rests on samples rather than on the defaults.
        expected = self._line_value(uncached, now)
        if expected > 0.0 and self._line.s0 >= MIN_LINE_WEIGHT:
            ratio = min(max(ttft / expected, 1.0 / MAX_SAMPLE_RATIO), MAX_SAMPLE_RATIO)
            pod.slowness.add(math.log(ratio), now, keep, half)
            self._slowness[pod_key] = self.slowness(pod_key, now)
        self._line.add(uncached, ttft, now, self.fleet_keep, half)

    def _explained(
        self, pod_key: str, ttft: float, uncached: float, prompt: float, now: float
    ) -> float:
        """The uncached length that explains `ttft` better: the expected one, or the
        whole prompt when the TTFT is nearer (in ratio) to what a miss on this pod costs.
        A prefix routing expected cached can be missing: evicted sooner than the index
        thought, or still being computed for an earlier request. Such a miss must teach
        neither the line (a long TTFT for a short uncached length) nor the pod's
        slowness."""
        slowness = self.slowness(pod_key, now)
        hit = slowness * self._line_value(uncached, now)
        miss = slowness * self._line_value(prompt, now)
        return prompt if ttft * ttft > hit * miss else uncached

    def forget(self, pod_key: str) -> None:
        self._pods.pop(pod_key, None)
        self._slowness.pop(pod_key, None)

    # -- reading ------------------------------------------------------------------------

    def slowness(self, pod_key: str, now: float | None = None) -> float:
        """How much slower than the fleet's line the pod's TTFT runs (1.0: typical)."""
        pod = self._pods.get(pod_key)
        if pod is None:
            return PRIOR_SLOWNESS
        now = self.clock() if now is None else now
        weight = pod.slowness.weight_at(now, self.half_life)
        log_slowness = pod.slowness.value * weight / (weight + PRIOR_SAMPLES)
        return PRIOR_SLOWNESS * math.exp(log_slowness)

    def slowness_of(self, pod_keys: Sequence[str], now: float) -> list[float]:
        """`slowness` of each pod (up to REFRESH_S old): one C-level pass."""
        if now - self._slowness_at >= REFRESH_S:
            self._slowness_at = now
            table = self._slowness
            for key in table:
                table[key] = self.slowness(key, now)
        return list(map(self._slowness.get, pod_keys, repeat(PRIOR_SLOWNESS)))  # type: ignore[arg-type]

    def expected_ttft(self, pod_key: str, uncached_chars: float, now: float | None = None) -> float:
        """Expected TTFT (seconds) on this pod for a request with this many uncached
        prompt characters, with no queue ahead of it."""
        now = self.clock() if now is None else now
        return self.slowness(pod_key, now) * self._line_value(max(uncached_chars, 0.0), now)

    def prefill_seconds(
        self, pod_key: str, uncached_chars: float, now: float | None = None
    ) -> float:
        """The prefill part of `expected_ttft`: the line's per-character cost only."""
        now = self.clock() if now is None else now
        return self.slowness(pod_key, now) * self.line()[1] * max(uncached_chars, 0.0)

    def duration(self, pod_key: str) -> float | None:
        """The pod's mean response duration, or the fleet's when it has none of its
        own; None before any response was seen."""
        pod = self._pods.get(pod_key)
        if pod is not None and pod.duration.weight > 0.0:
            return pod.duration.value
        return self._duration.value if self._duration.weight > 0.0 else None

    def pod(self, pod_key: str) -> dict[str, float | None]:
        """The pod's decayed means (seconds) and slowness, for /debug and tests."""
        pod = self._pods.get(pod_key)
        if pod is None:
            return {"ttft": None, "tpot": None, "duration": None, "slowness": PRIOR_SLOWNESS}
        return {
            "ttft": pod.ttft.value if pod.ttft.weight else None,
            "tpot": pod.tpot.value if pod.tpot.weight else None,
            "duration": pod.duration.value if pod.duration.weight else None,
            "slowness": self.slowness(pod_key),
        }

    def backlog_weight(self) -> float:
        """How much of a pod's prefill backlog (seconds of prefill routed to it and not
        done yet, as expected) adds to a new request's TTFT: 1 when the engine prefills
        one request after another, 0 when prefills run side by side. Fitted through the
        origin over the fleet's samples; BACKLOG_PRIOR until there are enough."""
        queue = self._queue
        if queue.s0 < MIN_LINE_WEIGHT or queue.sxx <= 0.0:
            return BACKLOG_PRIOR
        return min(max(queue.sxy / queue.sxx, 0.0), 1.5)

    def line(self) -> tuple[float, float]:
        """(base seconds, seconds per uncached character) of the fleet's TTFT line."""
        # Counted in samples, not in time: fading in time scales every sum alike and
        # leaves the coefficients as they were, so an idle spell keeps the line.
        if self._line.s0 < MIN_LINE_WEIGHT:
            return DEFAULT_BASE_S, DEFAULT_S_PER_CHAR
        return self._line.coefficients()

    def _line_value(self, uncached: float, now: float) -> float:
        base, per_char = self.line()
        return base + per_char * uncached
