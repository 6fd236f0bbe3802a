"""The routing config file (`--routing-config`): more profiles, and the default one.

    default: cache-aware            # optional: the profile of requests without a header
    profiles:
      - name: cache-aware
        filters: [endpoint-subset]  # optional, applied in order
        scorers:                    # name, weight (default 1), params (optional)
          - {name: prefix-cache, weight: 3, params: {max_load_gap: 4}}
          - {name: least-kv-cache, weight: 2}
          - least-request           # a bare name: weight 1
        picker: max-score           # or {name: max-score, params: {tolerance: 0.05}}
        session-affinity: false     # keep a session on its first pod

Everything is checked when the processor starts: a problem stops it with one line
naming the file, the profile and what is wrong (docs/configuration.md, "Routing
profiles").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway_extproc.routing import registry
from gateway_extproc.routing.registry import (
    PluginRef,
    PluginRegistry,
    ProfileSpec,
    RoutingConfigError,
    valid_name,
    valid_weight,
)

_TOP_KEYS = ("default", "profiles")
_PROFILE_KEYS = ("name", "filters", "scorers", "picker", "session-affinity")
_PLUGIN_KEYS = ("name", "params")
_SCORER_KEYS = ("name", "weight", "params")


@dataclass(frozen=True)
class RoutingConfig:
    source: str
    profiles: dict[str, ProfileSpec] = field(default_factory=dict)
    default: str | None = None


def load_routing_config(path: str, plugins: PluginRegistry | None = None) -> RoutingConfig:
    """Read and check a routing config file; RoutingConfigError names the problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RoutingConfigError(f"routing config {path}: cannot read it: {reason}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RoutingConfigError(f"routing config {path}: not valid YAML{at}: {problem}") from None
    return parse_routing_config(doc, path, plugins)


def parse_routing_config(
    doc: Any, source: str, plugins: PluginRegistry | None = None
) -> RoutingConfig:
    known = plugins if plugins is not None else registry.PLUGINS
    try:
        profiles, default = _parse(doc, known)
    except RoutingConfigError as exc:
        raise RoutingConfigError(f"routing config {source}: {exc}") from None
    return RoutingConfig(source, profiles, default)


def _parse(doc: Any, plugins: PluginRegistry) -> tuple[dict[str, ProfileSpec], str | None]:
    if not isinstance(doc, Mapping):
        raise RoutingConfigError("expected a mapping with `profiles` (and `default`)")
    _only(doc, _TOP_KEYS, "the top level")
    raw = doc.get("profiles") or []
    if not isinstance(raw, list):
        raise RoutingConfigError("`profiles` must be a list")
    profiles: dict[str, ProfileSpec] = {}
    for i, entry in enumerate(raw):
        name, spec = _profile(entry, f"profiles[{i}]", plugins)
        if name in plugins.profiles:
            raise RoutingConfigError(f"profile {name!r} is a built-in profile; choose another name")
        if name in profiles:
            raise RoutingConfigError(f"profile {name!r} is declared twice")
        profiles[name] = spec
    default = doc.get("default")
    known = [*plugins.profiles, *profiles]
    if default is not None and (not isinstance(default, str) or default not in known):
        raise RoutingConfigError(
            f"default {default!r} is not a profile; known: {', '.join(sorted(known))}"
        )
    return profiles, default


def _profile(entry: Any, where: str, plugins: PluginRegistry) -> tuple[str, ProfileSpec]:
    if not isinstance(entry, Mapping):
        raise RoutingConfigError(f"{where}: expected a mapping with a `name`")
    name = entry.get("name")
    if not isinstance(name, str) or not valid_name(name):
        raise RoutingConfigError(
            f"{where}: `name` must be a lower-case name without ':', ',' or spaces, not {name!r}"
        )
    where = f"profile {name!r}"
    _only(entry, _PROFILE_KEYS, where)
    filters = tuple(
        _plugin(f, f"{where}: filters[{k}]", "filter", plugins.filters)
        for k, f in enumerate(_list(entry, "filters", where))
    )
    scorers: list[tuple[PluginRef, float]] = []
    for k, raw in enumerate(_list(entry, "scorers", where)):
        scorer = _scorer(raw, f"{where}: scorers[{k}]", plugins)
        if any(seen.name == scorer[0].name for seen, _ in scorers):
            raise RoutingConfigError(f"{where}: scorer {scorer[0].name!r} is listed twice")
        scorers.append(scorer)
    picker = _plugin(
        entry.get("picker", "max-score"), f"{where}: picker", "picker", plugins.pickers
    )
    affinity = entry.get("session-affinity", False)
    if not isinstance(affinity, bool):
        raise RoutingConfigError(f"{where}: `session-affinity` must be true or false")
    return name, ProfileSpec(tuple(scorers), picker, filters, affinity)


def _scorer(raw: Any, where: str, plugins: PluginRegistry) -> tuple[PluginRef, float]:
    if isinstance(raw, str):
        return _plugin(raw, where, "scorer", plugins.scorers), 1.0
    if not isinstance(raw, Mapping):
        raise RoutingConfigError(f"{where}: expected a scorer name or {{name, weight, params}}")
    _only(raw, _SCORER_KEYS, where)
    ref = _plugin({k: v for k, v in raw.items() if k != "weight"}, where, "scorer", plugins.scorers)
    weight = raw.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not valid_weight(weight):
        raise RoutingConfigError(
            f"{where}: weight of {ref.name!r} must be a finite number above 0, not {weight!r}"
        )
    return ref, float(weight)


def _plugin(raw: Any, where: str, kind: str, known: Mapping[str, Any]) -> PluginRef:
    if isinstance(raw, Mapping):
        _only(raw, _PLUGIN_KEYS, where)
        name, params = raw.get("name"), raw.get("params") or {}
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise RoutingConfigError(f"{where}: `params` must be a mapping of names to values")
    else:
        name, params = raw, {}
    if not isinstance(name, str) or name not in known:
        raise RoutingConfigError(
            f"{where}: unknown {kind} {name!r}; known: {', '.join(sorted(known))}"
        )
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RoutingConfigError(f"{where}: parameter {key!r} of {name!r} must be finite")
    return PluginRef(name, dict(params))


def _list(entry: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = entry.get(key) or []
    if not isinstance(value, list):
        raise RoutingConfigError(f"{where}: `{key}` must be a list")
    return value


def _only(doc: Mapping[Any, Any], allowed: tuple[str, ...], where: str) -> None:
    extra = [k for k in doc if k not in allowed]
    if extra:
        raise RoutingConfigError(
            f"{where}: unknown key {extra[0]!r}; expected {', '.join(allowed)}"
        )
