"""Flow-control settings that are not flags: objectives and per-tenant limits (a YAML
file, `--flow-config`), and how far a request header is trusted (`--header-policy`,
parsed with the other flags in gateway_extproc/config.py).

    objectives:              # x-gateway-inference-objective -> priority
      critical: 100
      batch: -1              # negative: sheddable
    limits:
      window_seconds: 60     # the counting window: 60 makes the numbers RPM and TPM
      default: {requests: 600, tokens: 200000}
      tenants:               # per fairness id; a missing field inherits the default
        team-a: {requests: 1200}
        free-tier: {requests: 20, tokens: 5000}

A limit of 0 (or none given) means no limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml


class FlowConfigError(ValueError):
    """The flow-control file cannot be used; the message names the problem."""


class HeaderTrust(StrEnum):
    TRUSTED = "trusted"  # the value is used (a route may set it, see docs/configuration.md)
    IGNORED = "ignored"  # the value is dropped, as if the client had not sent it
    REJECTED = "rejected"  # a request carrying it is refused with 400


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """Requests and tokens one tenant may use per window; 0 means no limit."""

    requests: int = 0
    tokens: int = 0

    @property
    def any(self) -> bool:
        return bool(self.requests or self.tokens)


@dataclass(frozen=True, slots=True)
class FlowConfig:
    objectives: Mapping[str, int] = field(default_factory=dict)
    window_seconds: float = 60.0
    default_limits: TenantLimits = TenantLimits()
    tenant_limits: Mapping[str, TenantLimits] = field(default_factory=dict)

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.tenant_limits.get(tenant, self.default_limits)

    @property
    def has_limits(self) -> bool:
        return self.default_limits.any or any(t.any for t in self.tenant_limits.values())


def load_flow_config(path: str) -> FlowConfig:
    """The file at `path`, or the empty config when no path is given."""
    if not path:
        return FlowConfig()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FlowConfigError(f"cannot read the flow config {path}: {exc.strerror}") from None
    try:
        return parse_flow_config(text)
    except FlowConfigError as exc:
        raise FlowConfigError(f"{path}: {exc}") from None


def parse_flow_config(text: str) -> FlowConfig:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FlowConfigError(f"not valid YAML: {exc}") from None
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise FlowConfigError("the file must be a mapping (objectives:, limits:)")
    _no_unknown(doc, {"objectives", "limits"}, "the top level")
    objectives = _objectives(doc.get("objectives") or {})
    limits = doc.get("limits") or {}
    if not isinstance(limits, dict):
        raise FlowConfigError("limits must be a mapping")
    _no_unknown(limits, {"window_seconds", "default", "tenants"}, "limits")
    window = limits.get("window_seconds", 60)
    if isinstance(window, bool) or not isinstance(window, int | float) or not window > 0:
        raise FlowConfigError(f"limits.window_seconds must be a positive number, not {window!r}")
    default = _limits(limits.get("default") or {}, TenantLimits(), "limits.default")
    tenants = limits.get("tenants") or {}
    if not isinstance(tenants, dict):
        raise FlowConfigError("limits.tenants must map tenant names to limits")
    tenant_limits = {
        str(name): _limits(spec or {}, default, f"limits.tenants.{name}")
        for name, spec in tenants.items()
    }
    return FlowConfig(objectives, float(window), default, tenant_limits)


def _objectives(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise FlowConfigError("objectives must map objective names to integer priorities")
    out = {}
    for name, priority in raw.items():
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise FlowConfigError(f"objectives.{name} must be an integer, not {priority!r}")
        out[str(name)] = priority
    return out


def _limits(raw: Any, inherit: TenantLimits, where: str) -> TenantLimits:
    if not isinstance(raw, dict):
        raise FlowConfigError(f"{where} must be a mapping with requests and/or tokens")
    _no_unknown(raw, {"requests", "tokens"}, where)
    values = {}
    for name in ("requests", "tokens"):
        value = raw.get(name, getattr(inherit, name))
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FlowConfigError(f"{where}.{name} must be a whole number >= 0, not {value!r}")
        values[name] = value
    return TenantLimits(**values)


def _no_unknown(doc: dict[Any, Any], known: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in doc if k not in known)
    if unknown:
        raise FlowConfigError(
            f"unknown keys in {where}: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
