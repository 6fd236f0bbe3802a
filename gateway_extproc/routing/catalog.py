"""StrategyCatalog: strategy names (as the `routing-strategy` header and
--default-strategy write them) to profiles, built once and shared by every request.

`build_catalog` builds every profile of the plugin registry's table (`registry`), and
those of a routing config file, from the registered plugins, sharing one set of signals
and one instance of each scorer. It also understands weighted combinations of scorers,
written `prefix-cache:3,least-kv-cache:2,least-request:2` (a missing weight is 1): each
is parsed once into a max-score profile and cached (LRU, bounded, so clients cannot grow
it or its metric series without limit); a malformed one resolves to None, which the
router answers with a 400.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from gateway_extproc.metrics.store import MetricsStore
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing import registry as plugin_registry
from gateway_extproc.routing.affinity import SessionAffinity
from gateway_extproc.routing.base import Strategy
from gateway_extproc.routing.config import RoutingConfig
from gateway_extproc.routing.filters import EndpointSubsetFilter
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.measured import ResponseTiming
from gateway_extproc.routing.pickers import RandomPicker, RoundRobinPicker
from gateway_extproc.routing.plugins import Filter, PluginEnv, Scorer, WeightedScorers
from gateway_extproc.routing.profile import Profile
from gateway_extproc.routing.registry import (
    REQUEST_FILTERS,
    PluginRef,
    PluginRegistry,
    ProfileSpec,
    RoutingConfigError,
    valid_weight,
)
from gateway_extproc.routing.signals import PodSignals

Weights = list[tuple[str, float]]
# Builds the strategy for one canonical weighted name.
CombinationFactory = Callable[[str, Weights], Strategy]


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
        request_filters: Sequence[Filter] | None = None,
        on_response: Sequence[Callable[[ResponseTiming], None]] = (),
    ) -> None:
        chosen: list[Strategy] = (
            strategies
            if strategies is not None
            else [Profile("random", RandomPicker()), Profile("round-robin", RoundRobinPicker())]
        )
        self._by_name: dict[str, Strategy] = {s.name: s for s in chosen}
        self._scorer_names = frozenset(scorer_names)
        self._combine = combine
        self._forgetters = tuple(on_pod_removed)
        self._response_observers = tuple(on_response)
        self._on_evicted = on_combination_evicted
        self._max_combinations = max_combinations
        self._combinations: OrderedDict[str, Strategy] = OrderedDict()
        # What the router applies to every request before the strategy's own filters.
        self.request_filters: tuple[Filter, ...] = (
            tuple(request_filters) if request_filters is not None else (EndpointSubsetFilter(),)
        )

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
        if not valid_weight(weight):
            return None
        seen.add(name)
        parts.append((name, weight))
    return parts or None


def canonical_name(weights: Weights) -> str:
    return ",".join(f"{name}:{weight:g}" for name, weight in weights)


def build_profile(
    plugins: PluginRegistry,
    env: PluginEnv,
    name: str,
    spec: ProfileSpec,
    *,
    session_capacity: int = 100_000,
) -> Profile:
    """Profile `name` from its spec: its plugins made by `plugins`' factories, its
    scorers the shared instances of `env`."""
    try:
        filters = [plugins.make_filter(env, ref) for ref in spec.filters]
        parts: list[tuple[Scorer, float]] = [
            (env.scorer(ref.name, ref.params), weight) for ref, weight in spec.scorers
        ]
        weighted = WeightedScorers(parts)
        picker = plugins.make_picker(env, spec.picker, name, weighted)
    except (RoutingConfigError, ValueError) as exc:
        raise RoutingConfigError(f"profile {name!r}: {exc}") from None
    sessions = (
        SessionAffinity(env.signals, capacity=session_capacity) if spec.session_affinity else None
    )
    return Profile(name, picker, filters=filters, scorers=parts, sessions=sessions)


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
    plugins: PluginRegistry | None = None,
    routing: RoutingConfig | None = None,
    shared: Mapping[Hashable, Any] | None = None,
) -> StrategyCatalog:
    """Every profile the gateway offers (the registry's, then the routing config's),
    sharing one set of signals and pod state. Raises RoutingConfigError when one cannot
    be built.

    `store` None means engine metrics are off: metrics-driven profiles then work from
    our in-flight counts or fall back to random, counted as fallbacks. With `registry`,
    a deleted pod's prefix-index entries and sessions are dropped when the registry says
    so. `prefix_*` are the prefix-cache scorer's defaults. `shared` hands plugins what
    the server owns (`PluginEnv.shared(key, ...)` finds it under its key).
    """
    plugins = plugins if plugins is not None else plugin_registry.PLUGINS
    signals = PodSignals(
        store,
        inflight,
        slow_start_window=slow_start_window,
        warn_every=fallback_warn_every,
        clock=clock,
    )
    defaults = {
        "prefix-cache": {
            "block_chars": prefix_block_chars,
            "blocks_per_pod": prefix_blocks_per_pod,
            "max_load_gap": prefix_max_load_gap,
        },
        "precise-prefix-cache": {"max_load_gap": prefix_max_load_gap},
    }

    def make_scorer(env: PluginEnv, name: str, params: Mapping[str, object]) -> Scorer:
        return plugins.make_scorer(env, name, {**defaults.get(name, {}), **params})

    env = PluginEnv(signals, rng or random.Random(), make_scorer, shared)
    for scorer in plugins.scorers:  # a scorer that cannot be built stops the start
        env.scorer(scorer)
    request_filters = [plugins.make_filter(env, PluginRef(name)) for name in REQUEST_FILTERS]
    built: list[Profile] = [
        build_profile(plugins, env, name, spec, session_capacity=session_capacity)
        for name, spec in plugins.profiles.items()
    ]
    if routing is not None:
        try:
            built.extend(
                build_profile(plugins, env, name, spec, session_capacity=session_capacity)
                for name, spec in routing.profiles.items()
            )
        except RoutingConfigError as exc:
            raise RoutingConfigError(f"routing config {routing.source}: {exc}") from None

    def combine(name: str, weights: Weights) -> Strategy:
        spec = ProfileSpec(scorers=tuple((PluginRef(s), w) for s, w in weights))
        return build_profile(plugins, env, name, spec)

    def forget_plugin_state(pod_key: str) -> None:
        for forget in env.forgetters:
            forget(pod_key)

    strategies: list[Strategy] = list(built)
    catalog = StrategyCatalog(
        strategies,
        scorer_names=list(plugins.scorers),
        combine=combine,
        on_pod_removed=(
            signals.forget,
            forget_plugin_state,
            *(p.sessions.forget for p in built if p.sessions is not None),
        ),
        on_combination_evicted=signals.forget_strategy,
        max_combinations=max_combinations,
        request_filters=request_filters,
        on_response=env.response_observers,
    )
    if registry is not None:
        registry.on_pod_removed(catalog.forget)
    return catalog


def strategy_problem(
    name: str, routing: RoutingConfig | None = None, plugins: PluginRegistry | None = None
) -> str:
    """Why `name` names no strategy, in one sentence; "" when it names one: a profile
    (registered, or of the routing config) or a weighted combination of scorers. What
    `StrategyCatalog.resolve` accepts, known before anything is built (--default-strategy
    is checked with it when the command line is parsed)."""
    plugins = plugins if plugins is not None else plugin_registry.PLUGINS
    profiles = sorted({*plugins.profiles, *(routing.profiles if routing is not None else ())})
    wanted = name.strip().lower()
    if wanted in profiles:
        return ""
    if (":" in wanted or "," in wanted) and parse_weights(wanted, set(plugins.scorers)):
        return ""
    shown = name if len(name) <= 80 else name[:80] + "..."
    return (
        f"{shown!r} is not a routing strategy; known: {', '.join(profiles)} "
        f"(or scorers weighted as NAME:WEIGHT,...: {', '.join(sorted(plugins.scorers))})"
    )
