"""StrategyCatalog: strategy names (as the `routing-strategy` header and
--default-strategy write them) to Strategy objects, built once and shared by every request.

Besides the named strategies, a catalog built by `build_catalog` understands weighted
combinations of scorers, written `prefix-cache:3,least-kv-cache:2,least-request:2` (a
missing weight is 1). Each is parsed once and cached (LRU, bounded, so clients cannot grow
it or its metric series without limit); a malformed one resolves to None, which the router
answers with a 400.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.metrics.store import MetricsStore
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.affinity import SessionAffinityStrategy
from gateway_extproc.routing.base import Strategy
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.least_request import LeastRequestStrategy
from gateway_extproc.routing.measured import MeasuredLatency, ResponseTiming
from gateway_extproc.routing.picker import ScoredStrategy
from gateway_extproc.routing.precise_prefix import PrecisePrefixScorer
from gateway_extproc.routing.prefix import PrefixCacheScorer, PrefixIndex
from gateway_extproc.routing.prefix_capacity import CacheFitScorer, CachePressure, CapacityIndex
from gateway_extproc.routing.sampling import SampledStrategy
from gateway_extproc.routing.scorers import (
    KVCacheScorer,
    LatencyScorer,
    QueueScorer,
    Scorer,
    ThroughputScorer,
)
from gateway_extproc.routing.signals import PodSignals
from gateway_extproc.routing.simple import RandomStrategy, RoundRobinStrategy
from gateway_extproc.routing.ttft_predictor import PredictedTTFTScorer

Weights = list[tuple[str, float]]
# Builds the strategy for one canonical weighted name.
CombinationFactory = Callable[[str, Weights], Strategy]

# In single-signal strategies whose signal only moves when the engine is next scraped
# (KV cache, throughput), requests picked in between would all see the same numbers and
# land on the same pod. A light in-flight term spreads such a burst; a real difference in
# the main signal still dominates.
BURST_SPREAD_WEIGHT = 0.2
# The profile that routes requests which name no strategy (docs/configuration.md): the
# predicted time to first token (pod speed, cached prefix, queue), where a new prompt's
# blocks fit, and our in-flight counts to spread what the engines have not reported yet.
PREDICTED_LATENCY = "predicted-latency"
PREDICTED_LATENCY_WEIGHTS = [("predicted-ttft", 3.0), ("cache-fit", 1.0), ("least-request", 1.0)]


class StrategyCatalog:
    def __init__(
        self,
        strategies: list[Strategy] | None = None,
        *,
        scorer_names: Sequence[str] = (),
        combine: CombinationFactory | None = None,
        on_pod_removed: Sequence[Callable[[str], None]] = (),
        on_combination_evicted: Callable[[str], None] | None = None,
        max_combinations: int = 64,
        on_response: Sequence[Callable[[ResponseTiming], None]] = (),
    ) -> None:
        chosen: list[Strategy] = (
            strategies if strategies is not None else [RandomStrategy(), RoundRobinStrategy()]
        )
        self._by_name: dict[str, Strategy] = {s.name: s for s in chosen}
        self._scorer_names = frozenset(scorer_names)
        self._combine = combine
        self._forgetters = tuple(on_pod_removed)
        self._response_observers = tuple(on_response)
        self._on_evicted = on_combination_evicted
        self._max_combinations = max_combinations
        self._combinations: OrderedDict[str, Strategy] = OrderedDict()

    def resolve(self, name: str) -> Strategy | None:
        """The strategy for `name`, or None when the name means nothing."""
        wanted = name.strip().lower()
        found = self._by_name.get(wanted)
        if found is not None:
            return found
        if self._combine is None or not (":" in wanted or "," in wanted):
            return None
        cached = self._combinations.get(wanted)
        if cached is not None:
            self._combinations.move_to_end(wanted)
            return cached
        weights = parse_weights(wanted, self._scorer_names)
        if weights is None:
            return None
        strategy = self._combine(canonical_name(weights), weights)
        self._combinations[wanted] = strategy
        if len(self._combinations) > self._max_combinations:
            _, evicted = self._combinations.popitem(last=False)
            still_used = any(s.name == evicted.name for s in self._combinations.values())
            if self._on_evicted is not None and not still_used:
                self._on_evicted(evicted.name)
        return strategy

    def names(self) -> list[str]:
        """The named strategies (weighted combinations of `scorers()` come on top)."""
        return sorted(self._by_name)

    def scorers(self) -> list[str]:
        return sorted(self._scorer_names)

    def forget(self, pod: Pod) -> None:
        """Drop what strategies keep about a deleted pod (prefix index, sessions, ...)."""
        for forget in self._forgetters:
            forget(pod.key)

    def observe(self, timing: ResponseTiming) -> None:
        """A routed response ended: strategies that learn from measured latency see it."""
        for observe in self._response_observers:
            observe(timing)


def parse_weights(spec: str, known: frozenset[str] | set[str]) -> Weights | None:
    """`a:3,b:2,c` -> [("a", 3.0), ("b", 2.0), ("c", 1.0)], or None when malformed: an
    unknown or repeated scorer, an empty part, or a weight that is not a finite number > 0."""
    parts: Weights = []
    seen: set[str] = set()
    for raw in spec.split(","):
        name, colon, weight_text = raw.partition(":")
        name = name.strip().lower()
        if name not in known or name in seen:
            return None
        if colon:
            try:
                weight = float(weight_text.strip())
            except ValueError:
                return None
        else:
            weight = 1.0
        if not (0.0 < weight < math.inf):
            return None
        seen.add(name)
        parts.append((name, weight))
    return parts or None


def canonical_name(weights: Weights) -> str:
    return ",".join(f"{name}:{weight:g}" for name, weight in weights)


def build_catalog(
    store: MetricsStore | None,
    inflight: InFlightCounter,
    *,
    slow_start_window: float = 30.0,
    rng: random.Random | None = None,
    registry: ModelRegistry | None = None,
    prefix_block_chars: int = 128,
    prefix_blocks_per_pod: int = 8192,
    prefix_max_load_gap: int = 8,
    session_capacity: int = 100_000,
    max_combinations: int = 64,
    fallback_warn_every: float = 60.0,
    clock: Callable[[], float] | None = None,
    kv_index: KVBlockIndex | None = None,
) -> StrategyCatalog:
    """Every strategy the gateway offers, sharing one set of signals and pod state.

    `store` None means engine metrics are off: metrics-driven strategies then work from
    our in-flight counts or fall back to random, counted as fallbacks. With `registry`,
    a deleted pod's prefix-index entries and sessions are dropped when the registry says so.
    `kv_index` holds what the engines' KV-cache events report (precise-prefix-cache);
    without one, that scorer is the approximate one.
    """
    rng = rng or random.Random()
    signals = PodSignals(
        store,
        inflight,
        slow_start_window=slow_start_window,
        warn_every=fallback_warn_every,
        clock=clock,
    )
    index = PrefixIndex(block_chars=prefix_block_chars, blocks_per_pod=prefix_blocks_per_pod)
    pressure = CachePressure(
        CapacityIndex(block_chars=prefix_block_chars, blocks_per_pod=prefix_blocks_per_pod)
    )
    predicted = PredictedTTFTScorer(MeasuredLatency(clock=signals.now), pressure)
    queue = QueueScorer()
    approximate = PrefixCacheScorer(index, max_load_gap=prefix_max_load_gap)
    scorers: Mapping[str, Scorer] = {
        s.name: s
        for s in (
            queue,
            KVCacheScorer(),
            LatencyScorer(),
            ThroughputScorer(),
            approximate,
            PrecisePrefixScorer(
                kv_index if kv_index is not None else KVBlockIndex(),
                approximate,
                max_load_gap=prefix_max_load_gap,
            ),
            predicted,
            CacheFitScorer(pressure),
        )
    }

    def scored(name: str, weights: Weights) -> Strategy:
        parts = [(scorers[scorer], weight) for scorer, weight in weights]
        return ScoredStrategy(name, parts, signals, rng, tiebreak=queue)

    affinity = SessionAffinityStrategy(
        LeastRequestStrategy(signals, rng, name="session-affinity"),
        signals,
        capacity=session_capacity,
    )
    strategies: list[Strategy] = [
        RandomStrategy(rng),
        RoundRobinStrategy(),
        LeastRequestStrategy(signals, rng),
        scored("least-kv-cache", [("least-kv-cache", 1.0), ("least-request", BURST_SPREAD_WEIGHT)]),
        scored("least-latency", [("least-latency", 1.0)]),
        scored("throughput", [("throughput", 1.0), ("least-request", BURST_SPREAD_WEIGHT)]),
        scored("prefix-cache", [("prefix-cache", 1.0)]),
        scored("precise-prefix-cache", [("precise-prefix-cache", 1.0)]),
        SampledStrategy(
            scored(PREDICTED_LATENCY, PREDICTED_LATENCY_WEIGHTS), pressure, signals, rng
        ),
        affinity,
    ]
    catalog = StrategyCatalog(
        strategies,
        scorer_names=list(scorers),
        combine=scored,
        on_pod_removed=(
            signals.forget,
            index.forget,
            affinity.forget,
            pressure.index.forget,
            pressure.forget,
            predicted.forget,
        ),
        on_combination_evicted=signals.forget_strategy,
        max_combinations=max_combinations,
        on_response=(predicted.observed,),
    )
    if registry is not None:
        registry.on_pod_removed(catalog.forget)
    return catalog
