"""Routing plugins and profiles by name.

Three maps, name -> factory, hold every filter, scorer and picker a profile may name;
`BUILTIN_PROFILES` is the one table of the strategies the gateway offers out of the box.
Code outside this package adds its own before the processor starts:

    from gateway_extproc.routing.registry import register_scorer

    register_scorer("my-scorer", lambda env: MyScorer())

A filter or scorer factory is called as `factory(env, **params)`, a picker factory as
`factory(env, profile_name, scorers, **params)` (`scorers`: the profile's
`WeightedScorers`); `env` is the `plugins.PluginEnv` of the catalog being built and
`params` come from the routing config file. A factory raises ValueError or TypeError for
parameters it cannot take: the processor then refuses to start, naming the profile.
Every registered scorer is also built once without parameters when the processor
starts (weighted combinations use it so), so a scorer's parameters need defaults.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.routing.filters import EndpointSubsetFilter
from gateway_extproc.routing.measured import MeasuredLatency
from gateway_extproc.routing.pickers import (
    SCORE_TOLERANCE,
    MaxScorePicker,
    RandomPicker,
    RoundRobinPicker,
    WeightedRandomPicker,
)
from gateway_extproc.routing.plugins import Filter, Picker, PluginEnv, Scorer, WeightedScorers
from gateway_extproc.routing.precise_prefix import PrecisePrefixScorer
from gateway_extproc.routing.prefix import Placements, PrefixCacheScorer, PrefixIndex
from gateway_extproc.routing.prefix_capacity import CacheFitScorer, CachePressure, CapacityIndex
from gateway_extproc.routing.sampling import SAMPLE_SIZE, SampleFilter
from gateway_extproc.routing.scorers import (
    KVCacheScorer,
    LatencyScorer,
    QueueScorer,
    ThroughputScorer,
)
from gateway_extproc.routing.ttft_predictor import PredictedTTFTScorer

P = TypeVar("P")
FilterFactory = Callable[..., Filter]
ScorerFactory = Callable[..., Scorer]
PickerFactory = Callable[..., Picker]

# In single-signal strategies whose signal only moves when the engine is next scraped
# (KV cache, throughput), requests picked in between would all see the same numbers and
# land on the same pod. A light in-flight term spreads such a burst; a real difference in
# the main signal still dominates.
BURST_SPREAD_WEIGHT = 0.2
# The profile that routes requests which name no strategy (docs/configuration.md): the
# predicted time to first token (pod speed, cached prefix, queue), where a new prompt's
# blocks fit, and our in-flight counts to spread what the engines have not reported yet.
PREDICTED_LATENCY = "predicted-latency"


class RoutingConfigError(ValueError):
    """A profile, plugin or routing config the processor cannot run with; the message is
    one line naming the problem."""


@dataclass(frozen=True)
class PluginRef:
    """A plugin by name, with the parameters its factory is called with."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProfileSpec:
    """A profile before it is built: names and weights only."""

    scorers: tuple[tuple[PluginRef, float], ...] = ()
    picker: PluginRef = PluginRef("max-score")
    filters: tuple[PluginRef, ...] = ()
    session_affinity: bool = False


def profile(
    *scorers: tuple[str, float],
    picker: str = "max-score",
    filters: Sequence[str] = (),
    session_affinity: bool = False,
) -> ProfileSpec:
    """A ProfileSpec of plugins without parameters, as the built-in table writes them."""
    return ProfileSpec(
        scorers=tuple((PluginRef(name), float(weight)) for name, weight in scorers),
        picker=PluginRef(picker),
        filters=tuple(PluginRef(name) for name in filters),
        session_affinity=session_affinity,
    )


# The strategies the gateway offers by name (the `routing-strategy` header and
# --default-strategy). Weighted combinations of scorers (`prefix-cache:3,least-request:2`)
# and the profiles of a routing config file come on top.
BUILTIN_PROFILES: dict[str, ProfileSpec] = {
    "random": profile(picker="random"),
    "round-robin": profile(picker="round-robin"),
    "least-request": profile(("least-request", 1)),
    "least-kv-cache": profile(("least-kv-cache", 1), ("least-request", BURST_SPREAD_WEIGHT)),
    "least-latency": profile(("least-latency", 1)),
    "throughput": profile(("throughput", 1), ("least-request", BURST_SPREAD_WEIGHT)),
    "prefix-cache": profile(("prefix-cache", 1)),
    "precise-prefix-cache": profile(("precise-prefix-cache", 1)),
    "session-affinity": profile(("least-request", 1), session_affinity=True),
    PREDICTED_LATENCY: profile(
        ("predicted-ttft", 3), ("cache-fit", 1), ("least-request", 1), filters=("sample",)
    ),
}

# Filters the router applies to every request before any profile's own.
REQUEST_FILTERS: tuple[str, ...] = ("endpoint-subset",)


def valid_name(name: str) -> bool:
    """Names are matched lower-case and a weighted combination splits on ':' and ','."""
    return bool(name) and name == name.strip().lower() and not any(c in name for c in ":, \t")


def valid_weight(weight: float) -> bool:
    return 0.0 < weight < math.inf


class PluginRegistry:
    def __init__(self) -> None:
        self.filters: dict[str, FilterFactory] = {}
        self.scorers: dict[str, ScorerFactory] = {}
        self.pickers: dict[str, PickerFactory] = {}
        self.profiles: dict[str, ProfileSpec] = {}

    def copy(self) -> PluginRegistry:
        out = PluginRegistry()
        for name in ("filters", "scorers", "pickers", "profiles"):
            getattr(out, name).update(getattr(self, name))
        return out

    def register_filter(self, name: str, factory: FilterFactory, *, replace: bool = False) -> None:
        _add(self.filters, "filter", name, factory, replace)

    def register_scorer(self, name: str, factory: ScorerFactory, *, replace: bool = False) -> None:
        _add(self.scorers, "scorer", name, factory, replace)

    def register_picker(self, name: str, factory: PickerFactory, *, replace: bool = False) -> None:
        _add(self.pickers, "picker", name, factory, replace)

    def register_profile(self, name: str, spec: ProfileSpec, *, replace: bool = False) -> None:
        _add(self.profiles, "profile", name, spec, replace)

    # -- building -------------------------------------------------------------------------

    def make_filter(self, env: PluginEnv, ref: PluginRef) -> Filter:
        return _build(self.filters, "filter", Filter, ref, lambda f: f(env, **ref.params))

    def make_scorer(self, env: PluginEnv, name: str, params: Mapping[str, Any]) -> Scorer:
        ref = PluginRef(name, params)
        return _build(self.scorers, "scorer", Scorer, ref, lambda f: f(env, **params))

    def make_picker(
        self, env: PluginEnv, ref: PluginRef, profile_name: str, scorers: WeightedScorers
    ) -> Picker:
        return _build(
            self.pickers,
            "picker",
            Picker,
            ref,
            lambda f: f(env, profile_name, scorers, **ref.params),
        )


def _add(table: dict[str, Any], kind: str, name: str, value: Any, replace: bool) -> None:
    if not valid_name(name):
        raise ValueError(f"{kind} name {name!r} must be lower-case, without ':', ',' or spaces")
    if name in table and not replace:
        raise ValueError(f"a {kind} named {name!r} is already registered")
    table[name] = value


def _build(
    table: Mapping[str, Callable[..., P]],
    kind: str,
    base: type,
    ref: PluginRef,
    call: Callable[[Callable[..., P]], P],
) -> P:
    factory = table.get(ref.name)
    if factory is None:
        raise RoutingConfigError(f"unknown {kind} {ref.name!r}; known: {', '.join(sorted(table))}")
    try:
        built = call(factory)
    except (TypeError, ValueError) as exc:
        # "_factory() got an unexpected keyword argument 'x'": the function's name
        # means nothing to whoever wrote the config.
        problem = re.sub(r"^[\w<>.]+\(\) ", "", str(exc))
        raise RoutingConfigError(f"{kind} {ref.name!r}: {problem}") from None
    if not isinstance(built, base):
        raise RoutingConfigError(
            f"{kind} {ref.name!r}: its factory made a {type(built).__name__}, "
            f"not a {base.__module__}.{base.__name__}"
        )
    return built


# -- the built-in plugins ---------------------------------------------------------------------


def _prefix_cache(
    env: PluginEnv,
    *,
    block_chars: int = 128,
    blocks_per_pod: int = 8192,
    max_load_gap: int = 8,
) -> PrefixCacheScorer:
    # One index per block layout, shared by every prefix-cache scorer using it: each
    # profile's picks teach all of them where a prompt's prefix is cached.
    def new_index() -> PrefixIndex:
        index = PrefixIndex(block_chars=block_chars, blocks_per_pod=blocks_per_pod)
        env.on_pod_removed(index.forget)
        _placements(env).add(f"prefix-{block_chars}-{blocks_per_pod}", index)
        return index

    index = env.shared(("prefix-index", block_chars, blocks_per_pod), new_index)
    if max_load_gap < 0:
        raise ValueError("max_load_gap must not be negative")
    return PrefixCacheScorer(index, max_load_gap=max_load_gap)


def _placements(env: PluginEnv) -> Placements:
    """The process's prefix indexes (their hash seed, and placements shared by replicas
    when the server hands one over: build_catalog(shared=...))."""
    return env.shared(Placements, Placements)


def _precise_prefix_cache(env: PluginEnv, *, max_load_gap: int = 8) -> PrecisePrefixScorer:
    # The index the server's KV-event subscriber fills (build_catalog(shared=...)); the
    # approximate scorer answers for pods whose events are not trusted, and learns from
    # every pick.
    index = env.shared(KVBlockIndex, KVBlockIndex)
    return PrecisePrefixScorer(index, env.scorer("prefix-cache"), max_load_gap=max_load_gap)


def _cache_pressure(env: PluginEnv) -> CachePressure:
    """One cache-pressure model (the capacity-aware index) shared by the scorers using it."""

    def new_pressure() -> CachePressure:
        pressure = CachePressure(CapacityIndex())
        env.on_pod_removed(pressure.index.forget)
        _placements(env).add("capacity", pressure.index)
        env.on_pod_removed(pressure.forget)
        return pressure

    return env.shared(CachePressure, new_pressure)


def _predicted_ttft(env: PluginEnv) -> PredictedTTFTScorer:
    # The KV-event index the server's subscriber fills (as precise-prefix-cache reads it):
    # where a pod's events are trusted, the expected cached prefix is the engine's own.
    scorer = PredictedTTFTScorer(
        MeasuredLatency(clock=env.signals.now),
        _cache_pressure(env),
        events=env.shared(KVBlockIndex, KVBlockIndex),
    )
    env.on_pod_removed(scorer.forget)
    env.on_response(scorer.observed)
    return scorer


def _sample(env: PluginEnv, *, size: int = SAMPLE_SIZE) -> SampleFilter:
    # The prefix holders it keeps are those the default profile's scorers would favour.
    return SampleFilter(
        _cache_pressure(env),
        env.signals,
        env.rng,
        events=env.shared(KVBlockIndex, KVBlockIndex),
        size=size,
    )


def _max_score(
    env: PluginEnv,
    profile_name: str,
    scorers: WeightedScorers,
    *,
    tolerance: float = SCORE_TOLERANCE,
    tiebreak: str = "least-request",
) -> MaxScorePicker:
    return MaxScorePicker(
        profile_name,
        scorers,
        env.signals,
        env.rng,
        tiebreak=env.scorer(tiebreak),
        tolerance=tolerance,
    )


def _no_scorers(kind: str, scorers: WeightedScorers) -> None:
    if len(scorers):
        raise ValueError(f"the {kind} picker takes no scorers")


def _random(env: PluginEnv, profile_name: str, scorers: WeightedScorers) -> RandomPicker:
    _no_scorers("random", scorers)
    return RandomPicker(env.rng)


def _round_robin(env: PluginEnv, profile_name: str, scorers: WeightedScorers) -> RoundRobinPicker:
    _no_scorers("round-robin", scorers)
    return RoundRobinPicker()


def _builtins() -> PluginRegistry:
    plugins = PluginRegistry()
    plugins.register_filter("endpoint-subset", lambda env: EndpointSubsetFilter())
    plugins.register_filter("sample", _sample)
    plugins.register_scorer("least-request", lambda env: QueueScorer())
    plugins.register_scorer("least-kv-cache", lambda env: KVCacheScorer())
    plugins.register_scorer("least-latency", lambda env: LatencyScorer())
    plugins.register_scorer("throughput", lambda env: ThroughputScorer())
    plugins.register_scorer("prefix-cache", _prefix_cache)
    plugins.register_scorer("precise-prefix-cache", _precise_prefix_cache)
    plugins.register_scorer("predicted-ttft", _predicted_ttft)
    plugins.register_scorer("cache-fit", lambda env: CacheFitScorer(_cache_pressure(env)))
    plugins.register_picker("max-score", _max_score)
    plugins.register_picker(
        "weighted-random",
        lambda env, name, scorers: WeightedRandomPicker(name, scorers, env.signals, env.rng),
    )
    plugins.register_picker("random", _random)
    plugins.register_picker("round-robin", _round_robin)
    for name, spec in BUILTIN_PROFILES.items():
        plugins.register_profile(name, spec)
    return plugins


# The registry every catalog is built from unless given another.
PLUGINS = _builtins()


def register_filter(name: str, factory: FilterFactory, *, replace: bool = False) -> None:
    """Make filter `name` available to profiles: `factory(env, **params) -> Filter`."""
    PLUGINS.register_filter(name, factory, replace=replace)


def register_scorer(name: str, factory: ScorerFactory, *, replace: bool = False) -> None:
    """Make scorer `name` available to profiles and weighted combinations:
    `factory(env, **params) -> Scorer`."""
    PLUGINS.register_scorer(name, factory, replace=replace)


def register_picker(name: str, factory: PickerFactory, *, replace: bool = False) -> None:
    """Make picker `name` available to profiles:
    `factory(env, profile_name, scorers, **params) -> Picker`."""
    PLUGINS.register_picker(name, factory, replace=replace)


def register_profile(name: str, spec: ProfileSpec, *, replace: bool = False) -> None:
    """Offer profile `name` beside the built-in ones."""
    PLUGINS.register_profile(name, spec, replace=replace)
