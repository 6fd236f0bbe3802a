"""The built-in filters."""

from __future__ import annotations

from collections.abc import Sequence

from gateway_extproc.models.registry import Pod
from gateway_extproc.routing.base import RoutingRequest
from gateway_extproc.routing.health import PodHealth
from gateway_extproc.routing.plugins import Filter


class EndpointSubsetFilter(Filter):
    """Only the pods inside the endpoint subset the data plane asked for (Envoy's
    `x-gateway-destination-endpoint-subset` hint), when it sent one."""

    name = "endpoint-subset"
    detail = " inside the requested endpoint subset"

    def filter(self, candidates: Sequence[Pod], request: RoutingRequest) -> Sequence[Pod]:
        subset = request.subset
        if subset is None:
            return candidates
        return tuple(p for p in candidates if in_subset(p.address, subset))


def in_subset(address: str, subset: frozenset[str]) -> bool:
    """Is `address` (ip:port or [ip6]:port) named by `subset`, whose entries are
    endpoints (ip:port) or bare IPs (every port of that IP: every rank of a pod)?"""
    return address in subset or address.rpartition(":")[0].strip("[]") in subset


class HealthyFilter(Filter):
    """Passive health (health.py): leaves out the pods ejected for failing, but never
    every one (`PodHealth.usable`); the router applies it to every request, with the
    PodHealth its sessions report to."""

    name = "healthy"
    fail_open = True

    def __init__(self, health: PodHealth) -> None:
        self.health = health

    def filter(self, candidates: Sequence[Pod], request: RoutingRequest) -> Sequence[Pod]:
        # PodHealth keeps what it derives per candidate tuple: hand it the tuple itself.
        pods = candidates if isinstance(candidates, tuple) else tuple(candidates)
        return self.health.usable(pods)
