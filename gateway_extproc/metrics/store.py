"""MetricsStore: the latest engine metrics per pod, what they imply, and when they expire.

The scraper writes one `EngineSample` per successful scrape; the store keeps a short
history per pod so that counters and histogram sums become rates and recent means
without a Prometheus server, and publishes one immutable `PodMetrics` per pod for the
routing hot path. Stale values count as missing.

Staleness: a pod's metrics are fresh while they are younger than `staleness` or come
from the latest completed scrape round (`round_completed`), whichever is later, and never
once older than ROUND_LIMIT rounds. On a large fleet a round of scrapes can take longer
than `staleness` (seconds at thousands of pods); a fixed limit would then mark most pods
stale before their next scrape came, and metric-driven routing would fall back to random
because of the fleet's size alone. The newest values we have are still the best we
have: they stay in use until the next round completes. A pod that round could not scrape
(its scrape failed) goes stale then, so failing pods still drop out, one round later.

Engine load beyond ours: at each scrape the store notes how many requests the engine
holds (running + waiting) beyond the processor's own in-flight count to the pod at that
moment (`count_own`): requests other processor replicas (or anyone bypassing the
gateway) sent it. Routing adds that to its own live count (routing/signals.py), so two
replicas behind one Envoy see each other's load, one scrape late.

The store also remembers when each pod was first seen routable, which the slow-start ramp
and the cold-start histogram (`pod_coldstart_duration_seconds`) are measured from, and
forgets everything about a pod when it is deleted.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gateway_extproc import telemetry
from gateway_extproc.metrics.parser import EngineSample
from gateway_extproc.models.registry import Pod

# Journal entries kept (at least): a reader further behind than this rebuilds in full.
JOURNAL_KEEP = 4096
# Metrics kept in use past `staleness` because rounds are slow are never older than this
# many round lengths: should rounds stop completing, metrics still expire.
ROUND_LIMIT = 3

# The reasons a scrape can fail with; fixed so a deleted pod's series can all be removed.
SCRAPE_FAILURE_REASONS = (
    "connect",
    "timeout",
    "http_4xx",
    "http_5xx",
    "http_other",
    "parse",
    "error",
)


@dataclass(frozen=True, slots=True)
class PodMetrics:
    """What routing knows of one pod's engine at `scraped_at` (the store's clock).

    None means unknown (not exposed, not enough samples yet, or an unusable value such as
    NaN or a negative number); it is never replaced by a made-up zero. Recent means and
    rates cover the store's `rate_window`; a recent mean keeps its last value while no new
    request completes, since an idle pod's last latency is still the best estimate.
    """

    pod_key: str
    scraped_at: float
    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None  # 0..1
    prefix_cache_hit_rate: float | None = None  # 0..1, hits / queried tokens, recent
    ttft_mean_recent: float | None = None  # seconds
    itl_mean_recent: float | None = None  # seconds per output token
    e2e_mean_recent: float | None = None  # seconds
    tokens_per_second: float | None = None  # prompt + generation
    prompt_tokens_per_second: float | None = None
    generation_tokens_per_second: float | None = None
    running_lora_adapters: tuple[str, ...] | None = None
    waiting_lora_adapters: tuple[str, ...] | None = None
    max_lora: int | None = None
    prompt_tokens_total: float | None = None  # the engine's counter, as scraped
    requests_total: float | None = None  # requests the engine finished (e2e count)
    kv_block_size: int | None = None  # tokens per KV block (vllm:cache_config_info)
    kv_capacity_tokens: int | None = None  # the KV cache's size in tokens (same)


class _PodState:
    """Everything the store keeps about one pod."""

    __slots__ = ("coldstart_observed", "failures", "history", "metrics", "routable_since")

    def __init__(self) -> None:
        self.routable_since: float | None = None
        self.coldstart_observed = False
        self.metrics: PodMetrics | None = None
        # (time, sample); history[0] is the base the deltas are taken from.
        self.history: deque[tuple[float, EngineSample]] = deque()
        self.failures: dict[str, int] = {}


_COUNTERS = (
    "prefix_cache_queries",
    "prefix_cache_hits",
    "prompt_tokens",
    "generation_tokens",
    "ttft_sum",
    "ttft_count",
    "itl_sum",
    "itl_count",
    "e2e_sum",
    "e2e_count",
)


class MetricsStore:
    """Per-pod engine metrics with staleness, derived rates and cold-start bookkeeping.

    Not thread-safe by design: the scraper and the strategies run on the event loop.
    """

    def __init__(
        self,
        *,
        staleness: float = 2.0,
        rate_window: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if staleness <= 0 or rate_window <= 0:
            raise ValueError("staleness and rate_window must be positive")
        self.staleness = staleness
        self.rate_window = rate_window
        self.clock = clock
        # Start of the latest completed scrape round (None: none reported) and the age
        # beyond which round-kept metrics expire anyway (see the module docstring).
        self._round_started: float | None = None
        self._round_limit = staleness
        self._pods: dict[str, _PodState] = {}
        # Fresh metrics in scrape order (oldest first) so expiry only looks at the front;
        # `_waiting` mirrors it for the one value the least-request hot path sums.
        self._fresh: dict[str, PodMetrics] = {}
        self._waiting: dict[str, int] = {}
        # Likewise, the engine's running + waiting beyond our in-flight count at the
        # scrape (only pods where it is above 0), and how to read that count.
        self._foreign: dict[str, int] = {}
        self._own: Callable[[str], int] | None = None
        # Pods routable and never scraped yet, in the order they were first seen routable.
        self._cold: dict[str, float] = {}
        self._seen_routable: set[str] = set()
        # Moves whenever `fresh()` / `waiting()` / `foreign()` may answer differently (a
        # scrape recorded, a pod forgotten, metrics expired), by one per pod concerned,
        # and the journal names that pod: the router keeps per-pod vectors derived from
        # them and, since a scrape lands about as often as a request on a large fleet,
        # updates the few pods that changed (`changed_since`) rather than rebuilding them
        # per request.
        self.version = 0
        self._journal: list[str] = []
        self._dropped = 0  # journal entries trimmed from the front so far
        # Told of every scrape recorded: a request held for room may go now (flowcontrol).
        self._record_listeners: list[Callable[[], None]] = []

    # -- reading ------------------------------------------------------------------------

    def get(self, pod_key: str, now: float | None = None) -> PodMetrics | None:
        """The pod's metrics, or None when there are none or they are stale."""
        return self.fresh(now).get(pod_key)

    def stale_before(self, now: float | None = None) -> float:
        """Metrics scraped before this time (store clock) are stale at `now`: older than
        `staleness` and not from the latest completed round, or older than the round
        limit."""
        now = self.clock() if now is None else now
        cutoff = now - self.staleness
        started = self._round_started
        if started is not None and started < cutoff:
            cutoff = max(started, now - self._round_limit)
        return cutoff

    def latest(self, pod_key: str) -> PodMetrics | None:
        """The last good metrics even when stale (for /debug and fallback reasons)."""
        state = self._pods.get(pod_key)
        return state.metrics if state is not None else None

    def fresh(self, now: float | None = None) -> Mapping[str, PodMetrics]:
        """Pod key -> metrics for every pod whose metrics are not stale.

        A live view: valid until the next write; read it, do not keep it.
        """
        self._expire(self.clock() if now is None else now)
        return self._fresh

    def waiting(self, now: float | None = None) -> Mapping[str, int]:
        """Pod key -> the engine's waiting queue, for pods with fresh metrics that show it."""
        self._expire(self.clock() if now is None else now)
        return self._waiting

    def foreign(self, now: float | None = None) -> Mapping[str, int]:
        """Pod key -> requests the engine held at its last fresh scrape beyond our own
        in-flight count to it then (other replicas' requests), for pods where that is
        above 0."""
        self._expire(self.clock() if now is None else now)
        return self._foreign

    def fresh_version(self, now: float | None = None) -> int:
        """`version` once metrics stale at `now` have expired: equal answers mean
        `fresh()`, `waiting()` and `foreign()` have not changed in between."""
        self._expire(self.clock() if now is None else now)
        return self.version

    def changed_since(self, version: int) -> list[str] | None:
        """Keys of the pods whose entry in `fresh()` / `waiting()` / `foreign()` changed
        since the store was at `version` (one per change, so with repeats, in order), or
        None when the journal no longer reaches back that far. Expiry is counted as of the
        last `fresh_version` / `fresh` / `waiting` / `foreign` call."""
        start = version - self._dropped
        if start < 0:
            return None
        return self._journal[start:]

    def first_routable_at(self, pod_key: str) -> float | None:
        state = self._pods.get(pod_key)
        return state.routable_since if state is not None else None

    def cold(self) -> dict[str, float]:
        """Pod key -> first_routable_at for routable pods never scraped successfully,
        oldest first. The live dict (a dict so readers can walk it newest first): read
        it, never change it."""
        return self._cold

    def failures(self, pod_key: str) -> dict[str, int]:
        state = self._pods.get(pod_key)
        return dict(state.failures) if state is not None else {}

    def snapshot(self) -> dict[str, PodMetrics | None]:
        """Latest metrics (stale included) of every pod the store knows, for /debug."""
        return {key: state.metrics for key, state in self._pods.items()}

    def on_record(self, listener: Callable[[], None]) -> None:
        self._record_listeners.append(listener)

    def count_own(self, count: Callable[[str], int]) -> None:
        """Read `count(pod_key)`, this processor's requests in flight to the pod, at each
        scrape recorded from now on, to tell the engine's requests beyond ours."""
        self._own = count

    # -- writing ------------------------------------------------------------------------

    def mark_routable(self, pod_key: str, now: float | None = None) -> None:
        """Note that the pod is routable; only the first call for a pod counts."""
        state = self._pods.get(pod_key)
        if state is None:
            state = self._pods[pod_key] = _PodState()
        if state.routable_since is not None:
            return
        state.routable_since = self.clock() if now is None else now
        self._seen_routable.add(pod_key)
        if state.metrics is None:
            self._cold[pod_key] = state.routable_since

    def mark_routable_all(self, pod_keys: Iterable[str], now: float | None = None) -> None:
        """mark_routable for many pods at once; cheap when all were seen before."""
        keys = pod_keys if isinstance(pod_keys, list | tuple) else list(pod_keys)
        new = set(keys).difference(self._seen_routable)
        if new:
            now = self.clock() if now is None else now
            for key in keys:
                if key in new:
                    self.mark_routable(key, now)

    def record(self, pod_key: str, sample: EngineSample, now: float | None = None) -> PodMetrics:
        """Take one successful scrape; returns what routing will now see for the pod."""
        now = self.clock() if now is None else now
        state = self._pods.get(pod_key)
        if state is None:
            state = self._pods[pod_key] = _PodState()
        history = state.history
        if history and _went_backwards(history[-1][1], sample):
            # The engine restarted (counters reset): deltas across it mean nothing.
            history.clear()
        history.append((now, sample))
        while len(history) > 2 and now - history[1][0] >= self.rate_window:
            history.popleft()
        metrics = _derive(pod_key, now, sample, history[0], state.metrics)
        state.metrics = metrics

        if not state.coldstart_observed:
            state.coldstart_observed = True
            if state.routable_since is not None:
                telemetry.POD_COLDSTART.observe(max(0.0, now - state.routable_since))
        self._cold.pop(pod_key, None)

        # Move to the back: `_fresh` stays ordered by scrape time.
        self._changed(pod_key)
        self._fresh.pop(pod_key, None)
        self._fresh[pod_key] = metrics
        self._waiting.pop(pod_key, None)
        if metrics.waiting is not None:
            self._waiting[pod_key] = metrics.waiting
        self._foreign.pop(pod_key, None)
        if metrics.running is not None or metrics.waiting is not None:
            held = (metrics.running or 0) + (metrics.waiting or 0)
            # Ours reach the engine a moment after we count them (and leave our count
            # after it finished them), so this is a lower bound of the others' load.
            beyond = held - (self._own(pod_key) if self._own is not None else 0)
            if beyond > 0:
                self._foreign[pod_key] = beyond
        for listener in self._record_listeners:
            listener()
        return metrics

    def round_completed(self, started: float, seconds: float) -> None:
        """The scraper's round begun at `started` (store clock) has ended: every pod
        routable then has been scraped since, or its scrape failed. `seconds` is the
        round's length (its period, or the time its scrapes took if longer). Metrics
        recorded since `started` stay fresh until the next round completes, even when
        older than `staleness`, but never beyond ROUND_LIMIT x `seconds`."""
        if self._round_started is None or started > self._round_started:
            self._round_started = started
        self._round_limit = max(self.staleness, ROUND_LIMIT * seconds)

    def record_failure(self, pod_key: str, reason: str) -> None:
        """Count a failed scrape; the last good metrics stay until they are stale."""
        state = self._pods.get(pod_key)
        if state is None:
            state = self._pods[pod_key] = _PodState()
        state.failures[reason] = state.failures.get(reason, 0) + 1
        telemetry.METRICS_SCRAPE_FAILURES.labels(pod_key, reason).inc()

    def forget(self, pod: Pod | str) -> None:
        """Drop everything kept about a deleted pod, its Prometheus series included."""
        key = pod if isinstance(pod, str) else pod.key
        self._changed(key)
        self._pods.pop(key, None)
        self._fresh.pop(key, None)
        self._waiting.pop(key, None)
        self._foreign.pop(key, None)
        self._cold.pop(key, None)
        self._seen_routable.discard(key)
        for reason in SCRAPE_FAILURE_REASONS:
            telemetry.remove_series(telemetry.METRICS_SCRAPE_FAILURES, key, reason)

    def _expire(self, now: float) -> None:
        fresh = self._fresh
        if not fresh:
            return
        cutoff = self.stale_before(now)
        while fresh:
            key = next(iter(fresh))
            if fresh[key].scraped_at >= cutoff:
                return
            self._changed(key)
            del fresh[key]
            self._waiting.pop(key, None)
            self._foreign.pop(key, None)

    def _changed(self, pod_key: str) -> None:
        self.version += 1
        journal = self._journal
        journal.append(pod_key)
        if len(journal) >= 2 * JOURNAL_KEEP:  # trimmed in halves: amortised O(1)
            del journal[:JOURNAL_KEEP]
            self._dropped += JOURNAL_KEEP


def _usable(value: float | None) -> float | None:
    """A finite, non-negative value, or None: NaN, infinities and negatives mean unknown."""
    if value is None or not (0.0 <= value < math.inf):
        return None
    return value


def _went_backwards(before: EngineSample, after: EngineSample) -> bool:
    for name in _COUNTERS:
        old = getattr(before, name)
        new = getattr(after, name)
        if old is not None and new is not None and new < old:
            return True
    return False


def _delta(base: EngineSample, sample: EngineSample, name: str) -> float | None:
    old = _usable(getattr(base, name))
    new = _usable(getattr(sample, name))
    if old is None or new is None or new < old:
        return None
    return new - old


def _ratio(
    base: EngineSample, sample: EngineSample, num: str, den: str, previous: float | None
) -> float | None:
    d_num = _delta(base, sample, num)
    d_den = _delta(base, sample, den)
    if d_num is None or d_den is None:
        return None
    if d_den <= 0:
        return previous  # nothing new happened in the window: keep the last estimate
    return d_num / d_den


def _derive(
    pod_key: str,
    now: float,
    sample: EngineSample,
    base_entry: tuple[float, EngineSample],
    previous: PodMetrics | None,
) -> PodMetrics:
    base_time, base = base_entry
    elapsed = now - base_time

    def rate(*names: str) -> float | None:
        if elapsed <= 0:
            return None
        total = 0.0
        for name in names:
            d = _delta(base, sample, name)
            if d is None:
                return None
            total += d
        return total / elapsed

    prev = previous
    hit_rate = _ratio(
        base,
        sample,
        "prefix_cache_hits",
        "prefix_cache_queries",
        prev.prefix_cache_hit_rate if prev else None,
    )
    kv = _usable(sample.kv_cache_usage)
    running = _usable(sample.running)
    waiting = _usable(sample.waiting)
    return PodMetrics(
        pod_key=pod_key,
        scraped_at=now,
        running=round(running) if running is not None else None,
        waiting=round(waiting) if waiting is not None else None,
        kv_cache_usage=min(kv, 1.0) if kv is not None else None,
        prefix_cache_hit_rate=min(hit_rate, 1.0) if hit_rate is not None else None,
        ttft_mean_recent=_ratio(
            base, sample, "ttft_sum", "ttft_count", prev.ttft_mean_recent if prev else None
        ),
        itl_mean_recent=_ratio(
            base, sample, "itl_sum", "itl_count", prev.itl_mean_recent if prev else None
        ),
        e2e_mean_recent=_ratio(
            base, sample, "e2e_sum", "e2e_count", prev.e2e_mean_recent if prev else None
        ),
        tokens_per_second=rate("prompt_tokens", "generation_tokens"),
        prompt_tokens_per_second=rate("prompt_tokens"),
        generation_tokens_per_second=rate("generation_tokens"),
        running_lora_adapters=sample.running_lora_adapters,
        waiting_lora_adapters=sample.waiting_lora_adapters,
        max_lora=sample.max_lora,
        prompt_tokens_total=_usable(sample.prompt_tokens),
        requests_total=_usable(sample.e2e_count),
        kv_block_size=sample.kv_block_size,
        kv_capacity_tokens=sample.kv_capacity_tokens,
    )
