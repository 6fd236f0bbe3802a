"""Fault injection switched at runtime through `/admin/faults`.

`metrics`: "ok", "error" (500), "garbage" (not Prometheus text) or "hang" (no answer
until the client gives up); `slow_factor` multiplies TTFT, inter-token latency and
prefill time; `fail_requests` is the fraction of inference requests answered 500.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

METRICS_MODES = ("ok", "error", "garbage", "hang")


@dataclass(frozen=True, slots=True)
class FaultSettings:
    metrics: str = "ok"
    slow_factor: float = 1.0
    fail_requests: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_update(current: FaultSettings, update: Any) -> FaultSettings:
    """`current` with the fields named in `update` replaced; ValueError names what is wrong."""
    if not isinstance(update, dict):
        raise ValueError("the body must be a JSON object")
    known = {field.name for field in dataclasses.fields(FaultSettings)}
    unknown = sorted(set(update) - known)
    if unknown:
        raise ValueError(f"unknown fault settings: {', '.join(unknown)}")
    changes: dict[str, Any] = {}
    if "metrics" in update:
        mode = update["metrics"]
        if mode not in METRICS_MODES:
            raise ValueError(f"`metrics` must be one of {', '.join(METRICS_MODES)}")
        changes["metrics"] = mode
    if "slow_factor" in update:
        factor = _number(update["slow_factor"], "slow_factor")
        if factor <= 0:
            raise ValueError("`slow_factor` must be greater than 0")
        changes["slow_factor"] = factor
    if "fail_requests" in update:
        fraction = _number(update["fail_requests"], "fail_requests")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("`fail_requests` must be between 0 and 1")
        changes["fail_requests"] = fraction
    return dataclasses.replace(current, **changes)


def _number(value: Any, name: str) -> float:
    # bool is an int subclass; `true` is not a number anyone meant.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number")
    return float(value)


class Faults:
    """The current settings, shared by the HTTP layer and the engine."""

    def __init__(self, seed: int) -> None:
        self.settings = FaultSettings()
        self._rng = random.Random(seed)

    @property
    def slow_factor(self) -> float:
        return self.settings.slow_factor

    def update(self, update: Any) -> FaultSettings:
        self.settings = apply_update(self.settings, update)
        return self.settings

    def reset(self) -> FaultSettings:
        self.settings = FaultSettings()
        return self.settings

    def should_fail(self) -> bool:
        fraction = self.settings.fail_requests
        return fraction > 0.0 and self._rng.random() < fraction
