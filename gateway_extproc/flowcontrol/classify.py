"""Who a request is and how urgent: its priority and fairness id, from headers the
platform allows clients to set (`--header-policy`) and the `user` of OpenAI requests.

Priority: `x-gateway-priority` (an integer) when sent, else the priority of the objective
named by `x-gateway-inference-objective`, else 0. Higher leaves the queue first; below 0
is sheddable. Fairness id: `x-gateway-inference-fairness-id`, else the `user` header,
else the body's `user` field, else one id shared by everyone else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway_extproc import errors
from gateway_extproc.config import CONTROLLED_HEADERS, FAIRNESS_ID, OBJECTIVE, PRIORITY
from gateway_extproc.flowcontrol.config import HeaderTrust

PRIORITY_HEADER = CONTROLLED_HEADERS[PRIORITY]
OBJECTIVE_HEADER = CONTROLLED_HEADERS[OBJECTIVE]
FAIRNESS_HEADER = CONTROLLED_HEADERS[FAIRNESS_ID]

# Longer fairness ids are cut: they key counters (memory, Redis) and nothing needs more.
MAX_FAIRNESS_ID = 256
# Digits and a sign; anything longer is not a priority anyone means.
MAX_PRIORITY_CHARS = 12


@dataclass(frozen=True, slots=True)
class FlowKey:
    priority: int = 0
    fairness_id: str = ""  # "" is the id every request without one shares

    @property
    def sheddable(self) -> bool:
        return self.priority < 0


DEFAULT_KEY = FlowKey()


def screen_headers(headers: dict[str, str], policy: Mapping[str, HeaderTrust]) -> None:
    """Apply the header policy in place: ignored headers are dropped, a rejected one
    present is the client's 400."""
    for name, trust in policy.items():
        if name not in headers or trust is HeaderTrust.TRUSTED:
            continue
        if trust is HeaderTrust.REJECTED:
            raise errors.header_not_allowed(name)
        del headers[name]


def flow_key(headers: Mapping[str, str], body_user: str, objectives: Mapping[str, int]) -> FlowKey:
    """The request's priority and fairness id (headers already screened)."""
    raw = headers.get(PRIORITY_HEADER, "").strip()
    if raw:
        priority = _priority(raw)
    else:
        priority = objectives.get(headers.get(OBJECTIVE_HEADER, "").strip(), 0)
    fairness_id = (
        headers.get(FAIRNESS_HEADER, "").strip() or headers.get("user", "").strip() or body_user
    )
    return FlowKey(priority, fairness_id[:MAX_FAIRNESS_ID])


def _priority(raw: str) -> int:
    try:
        if len(raw) > MAX_PRIORITY_CHARS:
            raise ValueError
        return int(raw)
    except ValueError:
        raise errors.invalid_priority(raw[:40]) from None
